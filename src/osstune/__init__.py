"""osstune: LoRA fine-tuning for OpenAI's gpt-oss models, end to end.

The pipeline, in package order: ``data`` (load and parse datasets) -> ``chat`` (harmony rendering with exact
loss masks) -> ``models`` (loading, MXFP4, expert LoRA) -> ``train`` -> ``tracking`` -> ``infer`` -> ``export``
-> ``eval``. ``cli`` exposes every stage as an ``osstune`` subcommand.
"""

__version__ = "0.1.0"
