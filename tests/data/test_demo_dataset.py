"""Checks on the bundled demo dataset that `osstune demo` trains on (Mimi, the cat-girl persona)."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import pytest

DATASET = files("osstune").joinpath("resources/demo/catgirl.jsonl")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
SIGN_OFF = {"zh": "喵~", "en": "nya~"}
MESSAGE_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "thinking", "content"},
}
MAX_CHARS = 120


def language(text: str) -> str:
    """Return ``"zh"`` when ``text`` holds any CJK ideograph, else ``"en"``.

    Args:
        text: any string.
    """
    return "zh" if CJK.search(text) else "en"


def row_text(row: dict) -> str:
    """Join every string of a dataset row, for language detection and tag checks.

    Args:
        row: one parsed JSON line.
    """
    return "\n".join(value for message in row["messages"] for value in message.values())


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """The dataset file's lines, without line endings."""
    return DATASET.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def rows(lines: list[str]) -> list[dict]:
    """The dataset's rows, parsed."""
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("你好！", "zh"), ("Hi! 9 + 6 = 15, nya~", "en"), ("UNO，喵~", "zh"), ("Tokyo, nya~", "en")],
)
def test_language_detection(text: str, expected: str) -> None:
    assert language(text) == expected


def test_every_line_is_one_messages_object(lines: list[str]) -> None:
    assert lines, "the dataset is empty"
    for number, line in enumerate(lines, start=1):
        row = json.loads(line)
        assert isinstance(row, dict), f"line {number}"
        assert set(row) == {"messages"}, f"line {number}"
        assert isinstance(row["messages"], list), f"line {number}"


def test_size_and_language_balance(rows: list[dict]) -> None:
    counts = {"zh": 0, "en": 0}
    for row in rows:
        counts[language(row_text(row))] += 1
    assert len(rows) >= 220
    assert counts["zh"] >= 90
    assert counts["en"] >= 90


def test_turn_structure(rows: list[dict]) -> None:
    for number, row in enumerate(rows, start=1):
        roles = [message["role"] for message in row["messages"]]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns, f"line {number}: no turns"
        assert turns == ["user", "assistant"] * (len(turns) // 2), f"line {number}: {roles}"
        for message in row["messages"]:
            assert set(message) == MESSAGE_KEYS[message["role"]], f"line {number}: {message}"
            for value in message.values():
                assert isinstance(value, str) and value.strip() == value and value, f"line {number}: {message}"


def test_assistant_turns_think_and_sign_off_in_the_row_language(rows: list[dict]) -> None:
    for number, row in enumerate(rows, start=1):
        lang = language(row_text(row))
        for message in row["messages"]:
            if message["role"] != "assistant":
                continue
            assert message["content"].endswith(SIGN_OFF[lang]), f"line {number}: {message['content']!r}"
            assert language(message["thinking"]) == lang, f"line {number}: {message['thinking']!r}"
            assert len(message["content"]) <= MAX_CHARS, f"line {number}: answer too long"
            assert len(message["thinking"]) <= MAX_CHARS, f"line {number}: thinking too long"


def test_mix_of_system_prompts_and_two_turn_conversations(rows: list[dict]) -> None:
    with_system = [row for row in rows if row["messages"][0]["role"] == "system"]
    two_turn = [row for row in rows if sum(m["role"] == "assistant" for m in row["messages"]) == 2]
    assert len(with_system) >= 15
    assert len(two_turn) >= 15
    assert {language(row_text(row)) for row in with_system} == {"zh", "en"}
    assert {language(row_text(row)) for row in two_turn} == {"zh", "en"}


def test_no_duplicate_rows_or_prompts(lines: list[str], rows: list[dict]) -> None:
    canonical = [json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows]
    prompts = [tuple(m["content"] for m in row["messages"] if m["role"] != "assistant") for row in rows]
    assert len(set(lines)) == len(lines)
    assert len(set(canonical)) == len(canonical)
    assert len(set(prompts)) == len(prompts)


def test_no_harmony_tags_in_text(rows: list[dict]) -> None:
    for number, row in enumerate(rows, start=1):
        assert "<|" not in row_text(row), f"line {number}"
