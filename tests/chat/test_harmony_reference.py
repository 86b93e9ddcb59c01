"""Our harmony renderer against openai-harmony 0.0.8, token for token, on random conversations of every shape.

openai-harmony is the reference for the format; where it differs from the model's chat template, the template wins.
Each difference is handled explicitly below and asserted in its own test:

1. Developer instructions: the template writes ``# Instructions\\n\\n{text}\\n\\n`` before ``<|end|>``; harmony omits
   the trailing blank line when there are no tools (with tools both write ``\\n\\n# Tools``).
2. Tool results: the template JSON-encodes the tool content (``|tojson``), harmony writes it raw; the reference
   conversation is given the JSON-encoded text.
3. Tool calls: harmony writes ``<|constrain|>json`` (a special token) when asked for that content type; the template
   writes the plain text ``json``. The reference conversation uses content type ``json``.
4. Earlier reasoning: harmony keeps the analysis of earlier turns in conversations of 3+ turns; the template (and
   we) drop it. The reference conversation is built from the messages the template keeps.
"""

from __future__ import annotations

import json
import random
from typing import Any

import openai_harmony as oh
import pytest

from osstune.chat.harmony import render_prompt, render_training_samples
from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import RenderOptions

TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Gets the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. 北京"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "description": "Forecast days"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks up a word.",
            "parameters": {
                "type": "object",
                "properties": {"words": {"type": "array", "items": {"type": "string"}}, "exact": {"type": "boolean"}},
            },
        },
    },
)
TEXTS = [
    "Hello!",
    "What is 2+2?",
    "你好，今天天气怎么样？",
    "猫娘咪咪来了喵~",
    "Type <|end|> to stop, or <|start|> to go.",
    "multi\nline\n\ntext  with   spaces ",
    "emoji 😀 and ünïcödé",
    "code: `print(\"hi\")`",
    "<|return|><|call|><|message|>",
    " leading space",
]
EFFORTS = ("low", "medium", "high")


def random_text(rng: random.Random) -> str:
    return " ".join(rng.sample(TEXTS, rng.randint(1, 3)))


def random_conversation(rng: random.Random) -> Conversation:
    """A conversation with an optional developer message, 1-3 rounds, tool calls, and reasoning of every kind."""
    tools = tuple(rng.sample(TOOLS, rng.randint(1, 2))) if rng.random() < 0.4 else ()
    messages: list[Message] = []
    if rng.random() < 0.5:
        messages.append(Message(rng.choice(["system", "developer"]), random_text(rng)))
    for _ in range(rng.randint(1, 3)):
        messages.append(Message("user", random_text(rng)))
        for _ in range(rng.choice([0, 0, 1, 2]) if tools else 0):
            name = rng.choice(tools)["function"]["name"]
            arguments = {"city": rng.choice(["Paris", "北京"]), "days": rng.randint(1, 9)}
            kind = rng.choice(["thinking", "content", "none"])
            messages.append(
                Message(
                    "assistant",
                    random_text(rng) if kind == "content" else "",
                    thinking=random_text(rng) if kind == "thinking" else None,
                    tool_calls=(ToolCall(name, json.dumps(arguments, ensure_ascii=False)),),
                )
            )
            messages.append(Message("tool", json.dumps({"result": random_text(rng)}, ensure_ascii=False)))
        thinking = rng.choice([None, "", random_text(rng), random_text(rng)])
        messages.append(Message("assistant", random_text(rng), thinking=thinking))
    return Conversation(messages=tuple(messages), tools=tools)


def random_options(rng: random.Random, loss_scale: str = "last_round") -> RenderOptions:
    return RenderOptions(
        current_date=f"20{rng.randint(24, 30)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        reasoning_effort=rng.choice(EFFORTS),
        loss_scale=loss_scale,  # type: ignore[arg-type]
    )


def reference_conversation(conv: Conversation, options: RenderOptions) -> oh.Conversation:
    """The openai-harmony conversation holding exactly what the template renders when ``conv`` (which ends with
    the trained assistant turn) is a training sample."""
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(oh.ReasoningEffort(options.reasoning_effort.capitalize()))
        .with_conversation_start_date(options.current_date)
    )
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    messages = list(conv.messages)
    developer = messages.pop(0).content if messages[0].role in ("system", "developer") else ""
    if developer or conv.tools:
        content = oh.DeveloperContent.new()
        if developer:
            # Difference 1: harmony drops the template's trailing blank line when there are no tools.
            content = content.with_instructions(developer if conv.tools else developer + "\n\n")
        if conv.tools:
            content = content.with_function_tools(
                [
                    oh.ToolDescription.new(f["name"], f["description"], f["parameters"])
                    for f in (tool["function"] for tool in conv.tools)
                ]
            )
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, content))
    last = len(messages) - 1
    call_name = ""
    for index, message in enumerate(messages):
        later = messages[index + 1 : last]  # the trained turn is generated, so it does not count as "later"
        final_follows = any(m.role == "assistant" and not m.tool_calls for m in later)
        if message.role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, message.content))
        elif message.role == "tool":
            author = oh.Author.new(oh.Role.TOOL, f"functions.{call_name}")
            # Difference 2: the template JSON-encodes tool results.
            encoded = json.dumps(message.content, ensure_ascii=False)
            result = oh.Message.from_author_and_content(author, encoded)
            out.append(result.with_channel("commentary").with_recipient("assistant"))
        elif message.tool_calls:
            call = message.tool_calls[0]
            call_name = call.name
            analysis = message.thinking or message.content
            if analysis and (index == last or not final_follows):
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, analysis).with_channel("analysis"))
            # Difference 3: content type "json" as the template writes it, not "<|constrain|>json".
            out.append(
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.arguments)
                .with_channel("commentary")
                .with_recipient(f"functions.{call.name}")
                .with_content_type("json")
            )
        else:
            # Difference 4: earlier turns keep only their final answer.
            if index == last and message.thinking is not None:
                analysis = oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.thinking)
                out.append(analysis.with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.content).with_channel("final"))
    return oh.Conversation.from_messages(out)


def reference_tokens(encoding: Any, conv: Conversation, options: RenderOptions) -> list[int]:
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    return list(encoding.render_conversation_for_training(reference_conversation(conv, options), config))


def truncated(conv: Conversation, end: int) -> Conversation:
    return Conversation(messages=conv.messages[: end + 1], tools=conv.tools)


def test_random_conversations_match_openai_harmony(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    rng = random.Random(20250805)
    compared = 0
    shapes: set[str] = set()
    for _ in range(200):
        conv = random_conversation(rng)
        options = random_options(rng)
        for end, message in enumerate(conv.messages):
            if message.role != "assistant":
                continue
            prefix = truncated(conv, end)
            (sample,) = render_training_samples(prefix, o200k_tokenizer, options)
            assert sample.input_ids == reference_tokens(harmony_encoding, prefix, options), prefix
            compared += 1
            reasoning = "none" if message.thinking is None else bool(message.thinking)
            shapes.add("call" if message.tool_calls else f"final-{reasoning}")
    assert compared > 450
    assert shapes == {"call", "final-none", "final-False", "final-True"}


def test_default_samples_are_last_round_samples_of_truncated_conversations(o200k_tokenizer: Any) -> None:
    rng = random.Random(7)
    for _ in range(50):
        conv = random_conversation(rng)
        options = random_options(rng, "default")
        last_round = RenderOptions(
            current_date=options.current_date, reasoning_effort=options.reasoning_effort, loss_scale="last_round"
        )
        candidates = [
            render_training_samples(truncated(conv, end), o200k_tokenizer, last_round)[0].input_ids
            for end, m in enumerate(conv.messages)
            if m.role == "assistant"
        ]
        for sample in render_training_samples(conv, o200k_tokenizer, options):
            assert sample.input_ids in candidates


def test_prompt_matches_openai_harmony_completion(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    rng = random.Random(99)
    for _ in range(50):
        conv = random_conversation(rng)
        options = random_options(rng)
        # Up to a user turn: no earlier reasoning is involved, so harmony's completion rendering is the reference.
        cut = max(i for i, m in enumerate(conv.messages[:3]) if m.role == "user") + 1
        messages = conv.messages[:cut]
        reference = reference_conversation(Conversation(messages=messages, tools=conv.tools), options)
        expected = list(harmony_encoding.render_conversation_for_completion(reference, oh.Role.ASSISTANT))
        assert render_prompt(messages, o200k_tokenizer, options, tools=conv.tools) == expected


def test_literal_special_text_is_encoded_like_openai_harmony(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    text = "Type <|end|> and <|start|>assistant<|message|> here"
    conv = Conversation(messages=(Message("user", text), Message("assistant", text)))
    options = RenderOptions(current_date="2025-01-01", loss_scale="last_round")
    (sample,) = render_training_samples(conv, o200k_tokenizer, options)
    assert sample.input_ids == reference_tokens(harmony_encoding, conv, options)
    ordinary = harmony_encoding.encode(text, disallowed_special=())
    assert 200007 not in ordinary
    position = sample.input_ids.index(200008, len(sample.input_ids) - 40)  # <|message|> of the final answer
    assert sample.input_ids[position + 1 : position + 1 + len(ordinary)] == ordinary


def test_difference_developer_trailing_blank_line(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    options = RenderOptions(current_date="2025-01-01")
    messages = (Message("developer", "Answer in German."), Message("user", "Hi"))
    ours = o200k_tokenizer.decode(render_prompt(messages, o200k_tokenizer, options))
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in German.\n\n<|end|>" in ours
    plain = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(
                oh.Role.SYSTEM, oh.SystemContent.new().with_conversation_start_date("2025-01-01")
            ),
            oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Answer in German.")
            ),
            oh.Message.from_role_and_content(oh.Role.USER, "Hi"),
        ]
    )
    theirs = harmony_encoding.decode_utf8(harmony_encoding.render_conversation_for_completion(plain, oh.Role.ASSISTANT))
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in German.<|end|>" in theirs
    assert theirs.replace("German.<|end|>", "German.\n\n<|end|>") == ours


def test_difference_earlier_reasoning_is_dropped(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    rounds = [("Q1", "T1", "C1"), ("Q2", "T2", "C2"), ("Q3", "T3", "C3")]
    messages = []
    reference = []
    for question, thinking, content in rounds:
        messages += [Message("user", question), Message("assistant", content, thinking=thinking)]
        reference += [
            oh.Message.from_role_and_content(oh.Role.USER, question),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, thinking).with_channel("analysis"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"),
        ]
    theirs = harmony_encoding.decode_utf8(
        harmony_encoding.render_conversation_for_training(oh.Conversation.from_messages(reference))
    )
    # harmony (default config) keeps T2 of the second turn and drops only T1.
    assert "T1" not in theirs
    assert "<|channel|>analysis<|message|>T2<|end|>" in theirs
    options = RenderOptions(current_date="2025-01-01", loss_scale="last_round")
    (sample,) = render_training_samples(Conversation(messages=tuple(messages)), o200k_tokenizer, options)
    ours = o200k_tokenizer.decode(sample.input_ids)
    assert "T1" not in ours and "T2" not in ours
    assert ours.endswith(
        "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>C1<|end|>"
        "<|start|>user<|message|>Q2<|end|><|start|>assistant<|channel|>final<|message|>C2<|end|>"
        "<|start|>user<|message|>Q3<|end|><|start|>assistant<|channel|>analysis<|message|>T3<|end|>"
        "<|start|>assistant<|channel|>final<|message|>C3<|return|>"
    )


def test_difference_constrain_token_and_tool_result_quoting(o200k_tokenizer: Any, harmony_encoding: Any) -> None:
    call = (
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city": "Paris"}')
        .with_channel("commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    result = (
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), "sunny")
        .with_channel("commentary")
        .with_recipient("assistant")
    )
    rendered = harmony_encoding.render_conversation(oh.Conversation.from_messages([call, result]))
    theirs = harmony_encoding.decode_utf8(rendered)
    assert theirs == (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}'
        "<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>"
    )
    messages = (
        Message("user", "Weather?"),
        Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny"),
    )
    ours = o200k_tokenizer.decode(render_prompt(messages, o200k_tokenizer, RenderOptions(current_date="2025-01-01")))
    assert ours.endswith(
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
        '<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>'
        "<|start|>assistant"
    )


@pytest.mark.parametrize("effort", EFFORTS)
def test_reasoning_effort_and_date_match(o200k_tokenizer: Any, harmony_encoding: Any, effort: str) -> None:
    options = RenderOptions(current_date="2026-02-28", reasoning_effort=effort, loss_scale="last_round")
    conv = Conversation(messages=(Message("user", "Hi"), Message("assistant", "Hello", thinking="greet")))
    (sample,) = render_training_samples(conv, o200k_tokenizer, options)
    assert sample.input_ids == reference_tokens(harmony_encoding, conv, options)
    assert f"Reasoning: {effort}\n" in o200k_tokenizer.decode(sample.input_ids)
