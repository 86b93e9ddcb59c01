"""osstune.models.gpt_oss."""
