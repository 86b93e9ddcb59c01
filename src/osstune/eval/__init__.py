"""osstune.eval."""
