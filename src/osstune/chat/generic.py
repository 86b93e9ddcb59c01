"""The chat-template path for models that do not speak harmony.

Rendering is the tokenizer's own ``apply_chat_template``. Loss masks come from prefix renderings: the tokens that
rendering ``messages[:i + 1]`` adds to the generation-prompt rendering of ``messages[:i]`` are what the model writes
for assistant turn ``i``. That only works when the template is prefix-preserving; otherwise rendering fails with a
clear error instead of training on a misaligned mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from osstune.chat.messages import Conversation, Message
from osstune.chat.options import IGNORE_INDEX, RenderOptions, Sample
from osstune.errors import DataError, OsstuneError


def render_training_samples(conv: Conversation, tokenizer: Any, options: RenderOptions) -> list[Sample]:
    """Render one conversation with the tokenizer's chat template, with assistant-only loss labels.

    The conversation is cut after its last assistant turn and rendered as one sample. ``default`` and
    ``ignore_empty_think`` train every assistant turn, ``last_round`` only the last, ``all`` every token. A trained
    span stops after the tokenizer's eos token when it contains one (a template's newline after the end-of-turn
    token is never generated).

    Args:
        conv: the conversation.
        tokenizer: a ``transformers`` tokenizer with a chat template.
        options: ``system`` (default instructions) and ``loss_scale`` are used; harmony-only fields are ignored.

    Returns:
        A list with one sample.

    Raises:
        DataError: the conversation has no assistant turn.
        OsstuneError: the tokenizer has no chat template, or the template is not prefix-preserving for the
            turns that must be trained.
    """
    _require_template(tokenizer)
    messages = _template_messages(conv.messages, options)
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant:
        raise DataError(
            problem="the conversation has no assistant turn, so there is nothing to train",
            fix="add an assistant reply or remove the record",
            field="messages",
            reason="no_assistant",
        )
    if assistant[0] == 0:
        raise DataError(
            problem="the conversation starts with an assistant turn; the chat template needs a message before it "
            "to render the generation prompt that the turn answers",
            fix="start the conversation with a user (or system) message",
            field="messages[0].role",
            reason="assistant_first",
        )
    messages = messages[: assistant[-1] + 1]
    tools = list(conv.tools) or None
    input_ids = _apply(tokenizer, messages, tools, add_generation_prompt=False)
    if options.loss_scale == "all":
        return [Sample(input_ids=input_ids, labels=list(input_ids))]
    trained = assistant[-1:] if options.loss_scale == "last_round" else assistant
    labels = [IGNORE_INDEX] * len(input_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    for index in trained:
        prompt = _apply(tokenizer, messages[:index], tools, add_generation_prompt=True)
        turn = input_ids if index == assistant[-1] else _apply(tokenizer, messages[: index + 1], tools, False)
        _check_prefix(tokenizer, prompt, turn, f"the generation prompt before assistant turn {index}")
        _check_prefix(tokenizer, turn, input_ids, f"assistant turn {index} rendered as history")
        stop = len(turn)
        if eos is not None and eos in turn[len(prompt) :]:
            stop = turn.index(eos, len(prompt)) + 1
        labels[len(prompt) : stop] = input_ids[len(prompt) : stop]
    return [Sample(input_ids=input_ids, labels=labels)]


def render_prompt(
    messages: Sequence[Message],
    tokenizer: Any,
    options: RenderOptions,
    tools: Sequence[dict[str, Any]] = (),
) -> list[int]:
    """The inference prompt: the chat template applied to ``messages`` with the generation prompt.

    Args:
        messages: the conversation so far.
        tokenizer: a ``transformers`` tokenizer with a chat template.
        options: ``system`` (default instructions) is used; harmony-only fields are ignored.
        tools: function definitions in the OpenAI ``tools`` schema.

    Returns:
        The prompt token ids.

    Raises:
        OsstuneError: the tokenizer has no chat template.
    """
    _require_template(tokenizer)
    return _apply(tokenizer, _template_messages(messages, options), list(tools) or None, add_generation_prompt=True)


def _template_messages(messages: Sequence[Message], options: RenderOptions) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: developer becomes system, reasoning is ``reasoning_content``,
    tool calls are OpenAI-style with parsed JSON arguments, and ``options.system`` fills a missing system turn."""
    out: list[dict[str, Any]] = []
    if options.system and not (messages and messages[0].role in ("system", "developer")):
        out.append({"role": "system", "content": options.system})
    for message in messages:
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": message.content,
        }
        if message.thinking is not None:
            entry["reasoning_content"] = message.thinking
        if message.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
                for call in message.tool_calls
            ]
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out


def _arguments(arguments: str) -> Any:
    """Tool-call arguments as templates expect them: the parsed JSON object, or the raw string if not JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _apply(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool
) -> list[int]:
    """Token ids of the chat template applied to ``messages``."""
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


def _require_template(tokenizer: Any) -> None:
    """Refuse a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise OsstuneError(
            f"{_model_name(tokenizer)} has no chat template, so conversations cannot be rendered and masked; "
            "use a chat (instruct) model, or set a chat template on its tokenizer (tokenizer.chat_template)"
        )


def _check_prefix(tokenizer: Any, prefix: list[int], whole: list[int], what: str) -> None:
    """Refuse a template whose longer rendering does not start with the shorter one."""
    if whole[: len(prefix)] != prefix:
        raise OsstuneError(
            f"the chat template of {_model_name(tokenizer)} is not prefix-preserving ({what} is not a prefix of "
            "the later rendering), so its assistant turns cannot be masked exactly; train only the last turn "
            "with --loss_scale last_round, or use a prefix-preserving chat template"
        )


def _model_name(tokenizer: Any) -> str:
    """The model a tokenizer belongs to, for messages."""
    return getattr(tokenizer, "name_or_path", "") or "this model"
