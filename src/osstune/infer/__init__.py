"""osstune.infer."""
