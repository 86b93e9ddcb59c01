"""osstune.train."""
