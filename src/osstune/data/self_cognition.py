"""The built-in ``self-cognition`` dataset: who-are-you questions answered with the fine-tuned model's own identity.

The packaged file ``resources/self_cognition.jsonl`` holds Chinese and English question/answer pairs whose text
uses ``{{NAME}}`` and ``{{AUTHOR}}`` placeholders; ``--model_name`` and ``--model_author`` fill them in, each taking
one value for both languages or two values (Chinese first, then English), as in ms-swift.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

from osstune.errors import OsstuneError

SELF_COGNITION = "self-cognition"
LANGUAGES: tuple[str, ...] = ("zh", "en")
NAME_PLACEHOLDER = "{{NAME}}"
AUTHOR_PLACEHOLDER = "{{AUTHOR}}"
_RESOURCE = "resources/self_cognition.jsonl"


def self_cognition_resource_bytes() -> bytes:
    """The packaged self-cognition file, byte for byte (its hash keys the preprocessing cache)."""
    return resources.files("osstune").joinpath(_RESOURCE).read_bytes()


def self_cognition_pairs() -> list[dict[str, str]]:
    """The packaged pairs with their placeholders still in place.

    Returns:
        One dict per pair with keys ``lang`` (``zh`` or ``en``), ``query`` and ``response``, in file order.
    """
    lines = self_cognition_resource_bytes().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def self_cognition_records(model_name: Sequence[str], model_author: Sequence[str]) -> list[dict[str, Any]]:
    """The self-cognition dataset as ``messages`` records with the model's name and author filled in.

    Args:
        model_name: ``--model_name``: one name for both languages, or two (Chinese first, then English).
        model_author: ``--model_author``: one author for both languages, or two (Chinese first, then English).

    Returns:
        One record per pair, ``{"messages": [user, assistant], "lang": "zh" | "en"}``, in file order.

    Raises:
        OsstuneError: when a name or author is missing, empty, or given more than twice.
    """
    names = _per_language(model_name, "--model_name", "NAME")
    authors = _per_language(model_author, "--model_author", "AUTHOR")
    records = []
    for pair in self_cognition_pairs():
        lang = pair["lang"]
        name, author = names[lang], authors[lang]
        messages = [
            {"role": "user", "content": _fill(pair["query"], name, author)},
            {"role": "assistant", "content": _fill(pair["response"], name, author)},
        ]
        records.append({"messages": messages, "lang": lang})
    return records


def _fill(text: str, name: str, author: str) -> str:
    return text.replace(NAME_PLACEHOLDER, name).replace(AUTHOR_PLACEHOLDER, author)


def _per_language(values: Sequence[str], flag: str, metavar: str) -> dict[str, str]:
    given = [value.strip() for value in ([values] if isinstance(values, str) else values)]
    if not given or not all(given):
        raise OsstuneError(
            f"the {SELF_COGNITION} dataset needs the model's name and author: pass --model_name NAME and "
            f"--model_author AUTHOR (one value for both languages, or two: Chinese first, then English)"
        )
    if len(given) > len(LANGUAGES):
        raise OsstuneError(
            f"{flag} takes one value, or two (Chinese first, then English); got {len(given)}: {given}\n"
            f"  fix: pass e.g. {flag} {metavar}_ZH {metavar}_EN"
        )
    return {lang: given[min(i, len(given) - 1)] for i, lang in enumerate(LANGUAGES)}
