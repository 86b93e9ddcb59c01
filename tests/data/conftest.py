"""Fixtures for data tests: a gpt-oss model folder holding only config and the real o200k_harmony tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def gpt_oss_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, o200k_tokenizer: Any) -> Path:
    """A folder like a downloaded gpt-oss model, minus the weights: config.json and tokenizer files."""
    path = tmp_path_factory.mktemp("gpt-oss-tokenizer")
    o200k_tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "vocab_size": 201088}))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own dataset cache (the o200k files stay in the shared cache)."""
    monkeypatch.setenv("OSSTUNE_DATASET_CACHE", str(tmp_path / "dataset-cache"))
