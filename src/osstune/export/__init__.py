"""osstune.export."""
