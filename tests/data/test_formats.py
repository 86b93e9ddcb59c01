from __future__ import annotations

import json
from typing import Any

import pytest

from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.data.formats import detect_format, parse_record, validate_conversation
from osstune.errors import DataError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def bot(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def parse_error(record: dict[str, Any], fmt: str) -> DataError:
    with pytest.raises(DataError) as info:
        parse_record(record, fmt, source="train.jsonl")
    return info.value


# --- detect_format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": [], "system": "s"}, "sharegpt"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"output": "a"}, "alpaca"),
        ({"messages": [], "reasoning_language": "German", "developer": "d", "analysis": "x", "final": "y"}, "messages"),
    ],
)
def test_detect_format(record: dict[str, Any], fmt: str) -> None:
    assert detect_format(record, "train.jsonl") == fmt


def test_detect_format_unknown_shape_lists_keys_and_shapes() -> None:
    with pytest.raises(DataError) as info:
        detect_format({"query": "q", "response": "r"}, "train.jsonl", locator="line 4")
    err = info.value
    assert err.reason == "unknown_format"
    assert (err.source, err.record) == ("train.jsonl", "line 4")
    assert "keys found: query, response" in err.problem
    assert '"messages"' in err.fix and '"instruction"' in err.fix and '"conversations"' in err.fix
    assert str(err).startswith("train.jsonl, line 4: unrecognised record shape")


def test_detect_format_later_record_must_match_the_first() -> None:
    assert detect_format({"messages": []}, "a.json", locator="record 1", expected="messages") == "messages"
    with pytest.raises(DataError) as info:
        detect_format({"instruction": "q", "output": "a"}, "a.json", locator="record 3", expected="messages")
    assert info.value.reason == "mixed_formats"
    assert info.value.record == "record 3"
    assert "alpaca format but the file's first record is in messages format" in info.value.problem


# --- messages ------------------------------------------------------------------------------------------------


def test_messages_plain() -> None:
    record = {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!")]}
    assert parse_record(record, "messages", source="train.jsonl", index=3) == Conversation(
        messages=(
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
        ),
        source="train.jsonl",
        index=3,
    )


@pytest.mark.parametrize("key", ["thinking", "reasoning_content"])
def test_messages_reasoning_field(key: str) -> None:
    record = {"messages": [user("2+2?"), bot("4", **{key: "Add two and two."})]}
    conv = parse_record(record, "messages")
    assert conv.messages[1] == Message("assistant", "4", thinking="Add two and two.")


@pytest.mark.parametrize(
    ("content", "answer", "thinking"),
    [
        ("<think>\nAdd them.\n</think>\n\n4", "4", "Add them."),
        ("<think>\n\n</think>\n\n4", "4", ""),
        ("<think></think>4", "4", ""),
        ("  <think>  spaced out  </think>   4  ", "4", "spaced out"),
        ("\n<think>a\nb</think>\nline one\nline two\n", "line one\nline two", "a\nb"),
        ("no reasoning here", "no reasoning here", None),
        ("mentions <think> later", "mentions <think> later", None),
    ],
)
def test_messages_think_tags(content: str, answer: str, thinking: str | None) -> None:
    conv = parse_record({"messages": [user("q"), bot(content)]}, "messages")
    assert conv.messages[1] == Message("assistant", answer, thinking=thinking)


def test_messages_think_tag_missing_close_is_an_error() -> None:
    err = parse_error({"messages": [user("q"), bot("<think>still thinking... 4")]}, "messages")
    assert (err.field, err.reason) == ("messages[1].content", "unclosed_think")
    assert err.source == "train.jsonl"
    assert "</think>" in err.fix


def test_messages_think_close_without_open_is_an_error() -> None:
    err = parse_error({"messages": [user("q"), bot("reasoning</think>4")]}, "messages")
    assert (err.field, err.reason) == ("messages[1].content", "unopened_think")


def test_messages_thinking_in_field_and_content_is_an_error() -> None:
    err = parse_error({"messages": [user("q"), bot("<think>x</think>4", thinking="y")]}, "messages")
    assert (err.field, err.reason) == ("messages[1].content", "thinking_twice")
    assert "messages[1].thinking" in err.problem


def test_messages_both_reasoning_fields_is_an_error() -> None:
    err = parse_error({"messages": [user("q"), bot("4", thinking="a", reasoning_content="b")]}, "messages")
    assert (err.field, err.reason) == ("messages[1].reasoning_content", "thinking_twice")


def test_multilingual_thinking_rows() -> None:
    rows = [
        {
            "reasoning_language": "German",
            "developer": "Du bist ein hilfreicher Assistent.",
            "user": "What is the capital of France?",
            "analysis": "Die Hauptstadt von Frankreich ist Paris.",
            "final": "The capital of France is Paris.",
            "messages": [
                {
                    "content": "reasoning language: German\n\nDu bist ein hilfreicher Assistent.",
                    "role": "system",
                    "thinking": None,
                },
                {"content": "What is the capital of France?", "role": "user", "thinking": None},
                {
                    "content": "The capital of France is Paris.",
                    "role": "assistant",
                    "thinking": "Die Hauptstadt von Frankreich ist Paris.",
                },
            ],
        },
        {
            "messages": [
                {"content": "reasoning language: French", "role": "developer", "thinking": None},
                {"content": "Name a prime number.", "role": "user", "thinking": None},
                {"content": "7 is prime.", "role": "assistant", "thinking": "Sept n'a que deux diviseurs."},
                {"content": "Another one?", "role": "user", "thinking": None},
                {"content": "11.", "role": "assistant", "thinking": ""},
            ]
        },
    ]
    assert [parse_record(row, detect_format(row), source="mt.parquet", index=i) for i, row in enumerate(rows)] == [
        Conversation(
            messages=(
                Message("system", "reasoning language: German\n\nDu bist ein hilfreicher Assistent."),
                Message("user", "What is the capital of France?"),
                Message(
                    "assistant", "The capital of France is Paris.", thinking="Die Hauptstadt von Frankreich ist Paris."
                ),
            ),
            source="mt.parquet",
            index=0,
        ),
        Conversation(
            messages=(
                Message("developer", "reasoning language: French"),
                Message("user", "Name a prime number."),
                Message("assistant", "7 is prime.", thinking="Sept n'a que deux diviseurs."),
                Message("user", "Another one?"),
                Message("assistant", "11.", thinking=""),
            ),
            source="mt.parquet",
            index=1,
        ),
    ]


def test_thinking_on_a_user_turn_is_an_error() -> None:
    record = {"messages": [{"role": "user", "content": "q", "thinking": "hmm"}, bot("a")]}
    err = parse_error(record, "messages")
    assert (err.field, err.reason) == ("messages[0].thinking", "thinking_not_assistant")


def test_messages_tool_calls_and_results() -> None:
    record = {
        "tools": [WEATHER_TOOL, {"name": "get_time", "parameters": {"type": "object", "properties": {}}}],
        "messages": [
            user("Weather in Paris and Köln?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}},
                ],
            },
            {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
            {"role": "tool", "content": '{"temp": 17}'},
            bot("Paris 21°C, Köln 17°C."),
        ],
    }
    assert parse_record(record, "messages") == Conversation(
        messages=(
            Message("user", "Weather in Paris and Köln?"),
            Message(
                "assistant",
                "",
                tool_calls=(
                    ToolCall("get_weather", '{"city": "Paris"}'),
                    ToolCall("get_weather", '{"city": "Köln"}'),
                ),
            ),
            Message("tool", '{"temp": 21}', name="get_weather"),
            Message("tool", '{"temp": 17}'),
            Message("assistant", "Paris 21°C, Köln 17°C."),
        ),
        tools=(
            WEATHER_TOOL,
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
        ),
    )


def test_tools_given_as_json_text() -> None:
    record = {"tools": json.dumps([WEATHER_TOOL]), "messages": [user("q"), bot("a")]}
    assert parse_record(record, "messages").tools == (WEATHER_TOOL,)


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ([{"role": "tool", "content": "42"}, bot("a")], "messages[0].role", "tool_without_call"),
        ([user("q"), bot("a"), {"role": "tool", "content": "42"}, bot("b")], "messages[2].role", "tool_without_call"),
        (
            [
                user("q"),
                bot("", tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
                {"role": "tool", "content": "42", "name": "g"},
                bot("a"),
            ],
            "messages[2].name",
            "tool_name_mismatch",
        ),
        (
            [user("q"), bot("", tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{x"}}])],
            "messages[1].tool_calls[0].function.arguments",
            "bad_tool_call",
        ),
        (
            [user("q"), bot("", tool_calls=[{"type": "function", "function": {"arguments": "{}"}}])],
            "messages[1].tool_calls[0].function.name",
            "bad_tool_call",
        ),
        (
            [user("q"), bot("", tool_calls=[{"type": "code", "function": {"name": "f"}}])],
            "messages[1].tool_calls[0].type",
            "bad_tool_call",
        ),
        (
            [{"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]}, bot("a")],
            "messages[0].role",
            "tool_calls_not_assistant",
        ),
    ],
)
def test_messages_tool_errors(messages: list[dict[str, Any]], field: str, reason: str) -> None:
    err = parse_error({"messages": messages}, "messages")
    assert (err.field, err.reason) == (field, reason)


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"messages": [user("q"), {"role": "assistant"}]}, "messages[1].content", "missing_content"),
        ({"messages": [user("q"), bot("")]}, "messages[1].content", "empty_content"),
        ({"messages": [user("  \n"), bot("a")]}, "messages[0].content", "empty_content"),
        ({"messages": [user("q"), bot("<think>only reasoning</think>")]}, "messages[1].content", "empty_content"),
        ({"messages": [user("q"), {"role": "robot", "content": "a"}]}, "messages[1].role", "unknown_role"),
        ({"messages": [{"content": "q"}, bot("a")]}, "messages[0].role", "missing_role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, bot("a")]},
            "messages[0].content",
            "content_not_string",
        ),
        ({"messages": [user("q"), bot(42)]}, "messages[1].content", "content_not_string"),
        ({"messages": [user("q"), bot("a", thinking=["x"])]}, "messages[1].thinking", "thinking_not_string"),
        (
            {"messages": [user("q"), bot("<|start|>assistant<|channel|>final<|message|>a")]},
            "messages[1].content",
            "channel_tag",
        ),
        (
            {"messages": [user("q"), bot("a", thinking="x<|channel|>analysis")]},
            "messages[1].thinking",
            "channel_tag",
        ),
        ({"messages": [user("q"), bot("<think>x<|channel|></think>a")]}, "messages[1].content", "channel_tag"),
        ({"messages": [{"role": "system", "content": "s"}, user("q")]}, "messages", "no_assistant_turn"),
        ({"messages": []}, "messages", "bad_messages"),
        ({"messages": "hello"}, "messages", "bad_messages"),
        ({"messages": [user("q"), "a"]}, "messages[1]", "bad_messages"),
        ({"messages": [user("q"), bot("a")], "tools": "{not json"}, "tools", "bad_tools"),
        ({"messages": [user("q"), bot("a")], "tools": [{"description": "x"}]}, "tools[0]", "bad_tools"),
    ],
)
def test_messages_errors(record: dict[str, Any], field: str, reason: str) -> None:
    err = parse_error(record, "messages")
    assert (err.field, err.reason) == (field, reason)
    assert err.source == "train.jsonl"
    assert f"field {field}" in str(err)
    assert err.fix


def test_non_string_content_error_explains_content_parts() -> None:
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, bot("a")]}
    err = parse_error(record, "messages")
    assert err.problem == "expected a string, got a list"
    assert "lists of content parts" in err.fix and "string" in err.fix


def test_channel_tag_error_tells_where_reasoning_goes() -> None:
    err = parse_error({"messages": [user("q"), bot("x<|channel|>final")]}, "messages")
    assert "thinking" in err.fix and "content" in err.fix


def test_located_error_names_file_line_and_field() -> None:
    err = parse_error({"messages": [user("q"), bot("")]}, "messages").located("train.jsonl", "line 7")
    assert str(err) == (
        "train.jsonl, line 7, field messages[1].content: the assistant message is empty\n"
        "  fix: give the message its text, or remove the record"
    )


# --- alpaca --------------------------------------------------------------------------------------------------


def test_alpaca_full() -> None:
    record = {
        "system": "You are a translator.",
        "history": [["Translate: cat", "Katze"], ["Translate: dog", "<think>German noun</think>Hund"]],
        "instruction": "Translate to German:",
        "input": "house",
        "output": "<think>\nEasy one.\n</think>\n\nHaus",
    }
    assert parse_record(record, "alpaca", source="a.json", index=0) == Conversation(
        messages=(
            Message("system", "You are a translator."),
            Message("user", "Translate: cat"),
            Message("assistant", "Katze"),
            Message("user", "Translate: dog"),
            Message("assistant", "Hund", thinking="German noun"),
            Message("user", "Translate to German:\nhouse"),
            Message("assistant", "Haus", thinking="Easy one."),
        ),
        source="a.json",
    )


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}, {"system": ""}, {"history": []}])
def test_alpaca_minimal(extra: dict[str, Any]) -> None:
    record = {"instruction": "Say hi", "output": "Hi!", **extra}
    assert parse_record(record, "alpaca") == Conversation(
        messages=(Message("user", "Say hi"), Message("assistant", "Hi!"))
    )


@pytest.mark.parametrize(
    ("record", "query"),
    [
        ({"instruction": "", "input": "Only the input.", "output": "a"}, "Only the input."),
        ({"input": "Only the input.", "output": "a"}, "Only the input."),
        ({"instruction": "Sum:", "input": "1 2\n3", "output": "a"}, "Sum:\n1 2\n3"),
    ],
)
def test_alpaca_instruction_and_input_join(record: dict[str, Any], query: str) -> None:
    assert parse_record(record, "alpaca").messages[0] == Message("user", query)


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"instruction": "q"}, "output", "missing_content"),
        ({"instruction": "q", "output": ""}, "output", "empty_content"),
        ({"output": "a"}, "instruction", "missing_content"),
        ({"instruction": "", "output": "a"}, "instruction", "empty_content"),
        ({"instruction": " ", "input": "", "output": "a"}, "instruction", "empty_content"),
        ({"instruction": "q", "output": ["a", "b"]}, "output", "content_not_string"),
        ({"instruction": "q", "input": 3, "output": "a"}, "input", "content_not_string"),
        ({"instruction": "q", "output": "<think>x"}, "output", "unclosed_think"),
        ({"instruction": "q", "output": "a", "history": [["q0", ""]]}, "history[0][1]", "empty_content"),
        ({"instruction": "q", "output": "a", "history": [["q0", None]]}, "history[0][1]", "missing_content"),
        ({"instruction": "q", "output": "a", "history": [["q0"]]}, "history[0]", "bad_history"),
        ({"instruction": "q", "output": "a", "history": "q0"}, "history", "bad_history"),
        ({"instruction": "q", "output": "a<|channel|>"}, "output", "channel_tag"),
    ],
)
def test_alpaca_errors(record: dict[str, Any], field: str, reason: str) -> None:
    err = parse_error(record, "alpaca")
    assert (err.field, err.reason) == (field, reason)


# --- sharegpt ------------------------------------------------------------------------------------------------


def test_sharegpt_plain() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "<think>greet back</think>Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye!"},
        ]
    }
    assert parse_record(record, "sharegpt") == Conversation(
        messages=(
            Message("system", "Be kind."),
            Message("user", "Hi"),
            Message("assistant", "Hello!", thinking="greet back"),
            Message("user", "Bye"),
            Message("assistant", "Goodbye!"),
        )
    )


def test_sharegpt_top_level_system_tools_and_function_calls() -> None:
    record = {
        "system": "Use tools.",
        "tools": json.dumps([WEATHER_TOOL]),
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Roma"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny in Rome."},
            {"from": "human", "value": "And Oslo?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'},
            {"from": "tool", "value": "snow"},
            {"from": "gpt", "value": "Snow in Oslo."},
        ],
    }
    assert parse_record(record, "sharegpt") == Conversation(
        messages=(
            Message("system", "Use tools."),
            Message("user", "Weather in Rome?"),
            Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Roma"}'),)),
            Message("tool", "sunny"),
            Message("assistant", "Sunny in Rome."),
            Message("user", "And Oslo?"),
            Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Oslo"}'),)),
            Message("tool", "snow"),
            Message("assistant", "Snow in Oslo."),
        ),
        tools=(WEATHER_TOOL,),
    )


HUMAN_Q = {"from": "human", "value": "q"}
GPT_A = {"from": "gpt", "value": "a"}


@pytest.mark.parametrize(
    ("turns", "extra", "field", "reason"),
    [
        ([HUMAN_Q, {"from": "bot", "value": "a"}], {}, "conversations[1].from", "unknown_role"),
        ([HUMAN_Q, {"value": "a"}], {}, "conversations[1].from", "missing_role"),
        ([HUMAN_Q, {"from": "gpt", "value": ""}], {}, "conversations[1].value", "empty_content"),
        ([HUMAN_Q, {"from": "gpt"}], {}, "conversations[1].value", "missing_content"),
        ([{"from": "human", "value": ["q"]}, GPT_A], {}, "conversations[0].value", "content_not_string"),
        ([HUMAN_Q], {}, "conversations", "no_assistant_turn"),
        ([HUMAN_Q, {"from": "observation", "value": "x"}, GPT_A], {}, "conversations[1].from", "tool_without_call"),
        ([HUMAN_Q, {"from": "function_call", "value": "f(Rome)"}], {}, "conversations[1].value", "bad_tool_call"),
        ([HUMAN_Q, {"from": "function_call", "value": "[1]"}], {}, "conversations[1].value", "bad_tool_call"),
        ([HUMAN_Q, {"from": "function_call", "value": '{"name": 1}'}], {}, "conversations[1].value", "bad_tool_call"),
        ([{"from": "system", "value": "s"}, HUMAN_Q, GPT_A], {"system": "t"}, "system", "system_twice"),
        ([HUMAN_Q, {"from": "gpt", "value": "a</think>b"}], {}, "conversations[1].value", "unopened_think"),
        ([], {}, "conversations", "bad_messages"),
        ([HUMAN_Q, "a"], {}, "conversations[1]", "bad_messages"),
    ],
)
def test_sharegpt_errors(turns: list[Any], extra: dict[str, Any], field: str, reason: str) -> None:
    err = parse_error({"conversations": turns, **extra}, "sharegpt")
    assert (err.field, err.reason) == (field, reason)


# --- validate_conversation on hand-built conversations ---------------------------------------------------------


def test_validate_conversation_accepts_a_good_conversation() -> None:
    conv = Conversation(messages=(Message("user", "q"), Message("assistant", "a", thinking="")))
    assert validate_conversation(conv) is None


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ((Message("user", "q"), Message("assistant", "")), "messages[1].content", "empty_content"),
        ((Message("user", "q"), Message("robot", "a")), "messages[1].role", "unknown_role"),  # type: ignore[arg-type]
        (
            (Message("user", "q", thinking="t"), Message("assistant", "a")),
            "messages[0].thinking",
            "thinking_not_assistant",
        ),
        ((Message("user", "q"),), "messages", "no_assistant_turn"),
        ((Message("tool", "r"), Message("assistant", "a")), "messages[0].role", "tool_without_call"),
    ],
)
def test_validate_conversation_errors(messages: tuple[Message, ...], field: str, reason: str) -> None:
    with pytest.raises(DataError) as info:
        validate_conversation(Conversation(messages=messages))
    assert (info.value.field, info.value.reason) == (field, reason)


def test_unknown_format_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown dataset format 'xml'"):
        parse_record({"messages": []}, "xml")
