"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osstune.chat.tokenizer import build_o200k_harmony_tokenizer, default_cache_dir, harmony_encoding_dir


@pytest.fixture(scope="session")
def o200k_tokenizer() -> Any:
    """The real gpt-oss tokenizer (o200k_harmony), built offline from the bpe-openai wheel and cached on disk."""
    return build_o200k_harmony_tokenizer(default_cache_dir())


@pytest.fixture(scope="session")
def harmony_encoding() -> Iterator[Any]:
    """openai-harmony's gpt-oss encoding, loaded offline from the same cache folder as ``o200k_tokenizer``."""
    import openai_harmony

    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(harmony_encoding_dir(default_cache_dir()))
    try:
        yield openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gpt-oss in the real Hugging Face layout, experts in MXFP4 (written once per test session)."""
    from osstune.models.gpt_oss.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-gpt-oss") / "model", mxfp4=True)


@pytest.fixture(scope="session")
def tiny_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny gpt-oss with its experts stored dense in bf16."""
    from osstune.models.gpt_oss.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-gpt-oss-bf16") / "model", mxfp4=False)
