"""osstune.models."""
