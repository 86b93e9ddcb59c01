"""The generic chat-template path: masks from prefix renderings, and refusal of templates that cannot be masked."""

from __future__ import annotations

from typing import Any

import pytest

from osstune.chat.generic import render_prompt, render_training_samples
from osstune.chat.messages import Conversation, Message, ToolCall
from osstune.chat.options import IGNORE_INDEX, RenderOptions, Sample
from osstune.errors import DataError, OsstuneError

# ChatML-style, ending each turn with the tokenizer's eos token (<|return|> on o200k_harmony) and a newline.
CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content is defined %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif -%}"
    "{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    "{{ '<tool_call>' + c.function.name + ' ' + c.function.arguments|tojson + '</tool_call>' }}"
    "{% endfor -%}"
    "{{ eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
# Like Qwen3: reasoning is rendered only for the last assistant turn, so earlier renderings are not prefixes.
DROPS_EARLIER_REASONING = CHATML.replace(
    "{%- if m.reasoning_content is defined %}", "{%- if m.reasoning_content is defined and loop.last %}"
)


@pytest.fixture
def chatml(o200k_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(o200k_tokenizer, "chat_template", CHATML)
    return o200k_tokenizer


def spans(tokenizer: Any, sample: Sample) -> list[str]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in sample.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


CONV = Conversation(
    messages=(
        Message("system", "Be kind."),
        Message("user", "Q1"),
        Message("assistant", "A1", thinking="R1"),
        Message("user", "Q2"),
        Message("assistant", "A2"),
        Message("user", "unanswered"),
    )
)
FULL = (
    "<|im_start|>system\nBe kind.<|return|>\n<|im_start|>user\nQ1<|return|>\n"
    "<|im_start|>assistant\n<think>R1</think>A1<|return|>\n<|im_start|>user\nQ2<|return|>\n"
    "<|im_start|>assistant\nA2<|return|>\n"
)


def test_default_masks_exactly_the_assistant_replies(chatml: Any) -> None:
    (sample,) = render_training_samples(CONV, chatml, RenderOptions())
    assert chatml.decode(sample.input_ids) == FULL
    # The newline after the eos token is rendered by the template but never generated: not trained.
    assert spans(chatml, sample) == ["<think>R1</think>A1<|return|>", "A2<|return|>"]


def test_last_round_masks_only_the_last_reply(chatml: Any) -> None:
    (sample,) = render_training_samples(CONV, chatml, RenderOptions(loss_scale="last_round"))
    assert chatml.decode(sample.input_ids) == FULL
    assert spans(chatml, sample) == ["A2<|return|>"]


def test_ignore_empty_think_behaves_like_default(chatml: Any) -> None:
    default = render_training_samples(CONV, chatml, RenderOptions())
    assert render_training_samples(CONV, chatml, RenderOptions(loss_scale="ignore_empty_think")) == default


def test_all_trains_every_token(chatml: Any) -> None:
    (sample,) = render_training_samples(CONV, chatml, RenderOptions(loss_scale="all"))
    assert chatml.decode(sample.input_ids) == FULL
    assert sample.labels == sample.input_ids


def test_default_system_and_developer_role(chatml: Any) -> None:
    conv = Conversation(messages=(Message("user", "Q"), Message("assistant", "A")))
    (sample,) = render_training_samples(conv, chatml, RenderOptions(system="Default."))
    assert chatml.decode(sample.input_ids).startswith("<|im_start|>system\nDefault.<|return|>\n<|im_start|>user\n")
    developer = Conversation(messages=(Message("developer", "Dev."), Message("user", "Q"), Message("assistant", "A")))
    (sample,) = render_training_samples(developer, chatml, RenderOptions(system="Default."))
    assert chatml.decode(sample.input_ids).startswith("<|im_start|>system\nDev.<|return|>\n<|im_start|>user\n")


def test_tool_calls_reach_the_template_with_parsed_arguments(chatml: Any) -> None:
    conv = Conversation(
        messages=(
            Message("user", "Weather?"),
            Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city":"Paris"}'),)),
            Message("tool", "sunny"),
            Message("assistant", "Sunny."),
        )
    )
    (sample,) = render_training_samples(conv, chatml, RenderOptions())
    assert spans(chatml, sample) == [
        '<tool_call>get_weather {"city": "Paris"}</tool_call><|return|>',
        "Sunny.<|return|>",
    ]


def test_prompt_is_the_template_generation_prompt(chatml: Any) -> None:
    messages = [Message("user", "Q1"), Message("assistant", "A1")]
    ids = render_prompt(messages, chatml, RenderOptions(system="S"))
    assert chatml.decode(ids) == (
        "<|im_start|>system\nS<|return|>\n<|im_start|>user\nQ1<|return|>\n<|im_start|>assistant\nA1<|return|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_that_is_not_prefix_preserving_is_refused(
    o200k_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(o200k_tokenizer, "chat_template", DROPS_EARLIER_REASONING)
    monkeypatch.setattr(o200k_tokenizer, "name_or_path", "acme/reasoner-7b")
    with pytest.raises(OsstuneError, match=r"acme/reasoner-7b is not prefix-preserving.*--loss_scale last_round"):
        render_training_samples(CONV, o200k_tokenizer, RenderOptions())
    # Only the last turn is trained under last_round, and its own prompt is a prefix: that works.
    (sample,) = render_training_samples(CONV, o200k_tokenizer, RenderOptions(loss_scale="last_round"))
    assert spans(o200k_tokenizer, sample) == ["A2<|return|>"]


def test_tokenizer_without_chat_template_is_refused(o200k_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(o200k_tokenizer, "chat_template", None)
    monkeypatch.setattr(o200k_tokenizer, "name_or_path", "acme/base-7b")
    with pytest.raises(OsstuneError, match="acme/base-7b has no chat template"):
        render_training_samples(CONV, o200k_tokenizer, RenderOptions())
    with pytest.raises(OsstuneError, match="has no chat template"):
        render_prompt([Message("user", "Q")], o200k_tokenizer, RenderOptions())


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ((Message("user", "Q"),), "no_assistant"),
        ((Message("assistant", "A"), Message("user", "Q"), Message("assistant", "B")), "assistant_first"),
    ],
)
def test_unrenderable_conversations_are_data_errors(chatml: Any, messages: tuple[Message, ...], reason: str) -> None:
    with pytest.raises(DataError) as error:
        render_training_samples(Conversation(messages=messages), chatml, RenderOptions())
    assert error.value.reason == reason
