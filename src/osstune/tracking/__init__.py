"""osstune.tracking."""
