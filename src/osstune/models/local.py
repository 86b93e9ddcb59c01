"""Locating a model folder and reading its light parts (config and tokenizer) without touching the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from osstune.errors import OsstuneError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_model_dir(name_or_path: str | None) -> Path:
    """Return the local folder of a model, or explain what to do.

    Args:
        name_or_path: a local folder, or a Hugging Face hub name (only usable once downloaded to a folder).

    Raises:
        OsstuneError: when no folder is given, it does not exist, or it lacks a config or tokenizer.
    """
    if not name_or_path:
        raise OsstuneError("--model is required: give the local folder of a Hugging Face model "
                           "(it must hold config.json and the tokenizer files).")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = ""
        if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
            hint = (f" It looks like a hub name: osstune reads models from local folders. On a machine with "
                    f"network, run `huggingface-cli download {name_or_path} --local-dir DIR` and pass --model DIR.")
        raise OsstuneError(f"--model {name_or_path}: no such folder.{hint}")
    if not path.is_dir():
        raise OsstuneError(f"--model {name_or_path}: not a folder. Pass the model's folder, not a file in it.")
    if not (path / "config.json").is_file():
        raise OsstuneError(f"--model {name_or_path}: config.json is missing; this is not a Hugging Face model folder.")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise OsstuneError(f"--model {name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the folder.")
    return path


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder."""
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise OsstuneError(f"{model_dir / 'config.json'}: not valid JSON (line {exc.lineno}: {exc.msg}).") from None


def is_gpt_oss(config: dict[str, Any]) -> bool:
    """Whether a model config describes gpt-oss (the first-class path); anything else takes the generic path."""
    return config.get("model_type") == "gpt_oss"


def load_tokenizer(model_dir: Path) -> Any:
    """Load the tokenizer of a local model folder (offline; reads only tokenizer files)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise OsstuneError(f"{model_dir}: the tokenizer could not be loaded ({exc}).") from None
