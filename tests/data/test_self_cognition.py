from __future__ import annotations

import re

import pytest

from osstune.chat.messages import Conversation, Message
from osstune.data.formats import detect_format, parse_record
from osstune.data.self_cognition import self_cognition_pairs, self_cognition_records
from osstune.errors import OsstuneError

CJK = re.compile(r"[\u4e00-\u9fff]")
SENTENCE_END = re.compile(r"[。！？]|[.!?](?:\s|$)")


def test_at_least_sixty_distinct_pairs_per_language() -> None:
    pairs = self_cognition_pairs()
    for lang in ("zh", "en"):
        queries = [pair["query"] for pair in pairs if pair["lang"] == lang]
        assert len(queries) >= 60
        assert len(set(queries)) == len(queries)
    assert {pair["lang"] for pair in pairs} == {"zh", "en"}
    assert all(set(pair) == {"lang", "query", "response"} for pair in pairs)


def test_pairs_are_written_in_their_language_and_kept_short() -> None:
    for pair in self_cognition_pairs():
        text = pair["query"] + pair["response"]
        assert bool(CJK.search(text)) == (pair["lang"] == "zh"), pair
        assert 1 <= len(SENTENCE_END.findall(pair["response"])) <= 3, pair


def test_placeholders_appear_in_answers_and_some_questions() -> None:
    pairs = self_cognition_pairs()
    for lang in ("zh", "en"):
        mine = [pair for pair in pairs if pair["lang"] == lang]
        assert all("{{NAME}}" in p["query"] + p["response"] or "{{AUTHOR}}" in p["response"] for p in mine)
        assert sum("{{AUTHOR}}" in p["response"] for p in mine) >= 40
        assert sum("{{NAME}}" in p["response"] for p in mine) >= 40
        assert sum("{{" in p["query"] for p in mine) >= 3
    placeholders = {m for p in pairs for m in re.findall(r"\{\{[^}]*\}\}", p["query"] + p["response"])}
    assert placeholders == {"{{NAME}}", "{{AUTHOR}}"}


def test_records_fill_each_language_with_its_own_name() -> None:
    records = self_cognition_records(["小黄", "Little Yellow"], ["广西Bot团队", "GX Bot Team"])
    assert len(records) == len(self_cognition_pairs())
    assert records[0] == {
        "messages": [
            {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是小黄，由广西Bot团队开发的人工智能助手。有什么可以帮你的吗？"},
        ],
        "lang": "zh",
    }
    for record in records:
        text = "".join(message["content"] for message in record["messages"])
        assert "{{" not in text and "}}" not in text
        if record["lang"] == "zh":
            assert "Little Yellow" not in text and "GX Bot Team" not in text
            assert "小黄" in text or "广西Bot团队" in text
        else:
            assert "小黄" not in text and "广西Bot团队" not in text
            assert "Little Yellow" in text or "GX Bot Team" in text
    english = [r for r in records if r["lang"] == "en"]
    assert english[0]["messages"][1]["content"] == (
        "I'm Little Yellow, an AI assistant developed by GX Bot Team. "
        "I'm here to answer questions and help with whatever you're working on."
    )


def test_one_value_flags_serve_both_languages() -> None:
    records = self_cognition_records(["gxb-gpt-oss-20b-agent-distill"], ["gxb"])
    for record in records:
        text = "".join(message["content"] for message in record["messages"])
        assert "{{" not in text
        assert "gxb-gpt-oss-20b-agent-distill" in text or "gxb" in text
    assert records == self_cognition_records(["gxb-gpt-oss-20b-agent-distill"] * 2, ["gxb", "gxb"])
    assert records == self_cognition_records("gxb-gpt-oss-20b-agent-distill", " gxb ")


def test_records_parse_as_messages_conversations() -> None:
    record = self_cognition_records(["Ada"], ["Lab"])[-1]
    assert detect_format(record) == "messages"
    assert parse_record(record, "messages", source="self-cognition", index=137) == Conversation(
        messages=(
            Message("user", "Thanks! Who should I thank for building you?"),
            Message("assistant", "You're welcome! I was built by Lab."),
        ),
        source="self-cognition",
        index=137,
    )
    assert len(self_cognition_pairs()) == 138


@pytest.mark.parametrize(
    ("name", "author"),
    [([], ["gxb"]), (["bot"], []), ([], []), ([""], ["gxb"]), (["bot"], ["  "])],
)
def test_missing_name_or_author_is_an_error(name: list[str], author: list[str]) -> None:
    with pytest.raises(OsstuneError) as info:
        self_cognition_records(name, author)
    assert "pass --model_name NAME and --model_author AUTHOR" in str(info.value)


def test_more_than_two_values_is_an_error() -> None:
    with pytest.raises(OsstuneError, match="--model_author takes one value, or two"):
        self_cognition_records(["bot"], ["a", "b", "c"])
