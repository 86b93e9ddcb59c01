"""Dataset record formats (``messages``, alpaca, sharegpt) parsed into ``Conversation`` objects.

A file's format is detected from its first record; every later record of that file must have the same shape.
Assistant reasoning may come from a ``thinking`` or ``reasoning_content`` field, or from a leading
``<think>...</think>`` block in the assistant text. Every problem is a ``DataError`` whose ``field`` is the JSON path
of the offending value in the record as written (``messages[2].content``, ``conversations[1].value``,
``history[0][1]``, ``output``) and whose ``reason`` is a stable key for counting skipped records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from osstune.chat.messages import ROLES, Conversation, Message, ToolCall
from osstune.errors import DataError

FORMATS: tuple[str, ...] = ("messages", "alpaca", "sharegpt")
ACCEPTED_SHAPES = (
    'messages {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}; '
    'alpaca {"instruction": "...", "input": "...", "output": "..."}; '
    'sharegpt {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'
)
SHAREGPT_ROLES: Mapping[str, str] = MappingProxyType(
    {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "function_call": "assistant",
        "system": "system",
        "tool": "tool",
        "observation": "tool",
    }
)
_CONTAINERS: Mapping[str, str] = MappingProxyType(
    {"messages": "messages", "alpaca": "output", "sharegpt": "conversations"}
)
CHANNEL_TAG = "<|channel|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_TOOL_CALLS_FIX = 'write tool calls as [{"type": "function", "function": {"name": "...", "arguments": "{...}"}}]'
_FUNCTION_CALL_FIX = 'write the function_call value as JSON text: {"name": "...", "arguments": {...}}'
_NOT_STRING_FIX = (
    "give the text as one plain string; lists of content parts (multimodal messages) are not supported"
)


@dataclass(frozen=True)
class MessagePaths:
    """Where one parsed message's values sit in the record as written, for error messages.

    Args:
        role: path of the role, e.g. ``messages[2].role`` or ``conversations[2].from``.
        content: path of the text, e.g. ``messages[2].content``, ``conversations[2].value`` or ``output``.
        thinking: path of the reasoning (a ``thinking`` or ``reasoning_content`` field, or the content itself when
            the reasoning came from a ``<think>`` block).
        name: path of a tool message's function name, e.g. ``messages[3].name``; empty where there is none.
    """

    role: str
    content: str
    thinking: str
    name: str = ""

    @classmethod
    def of_message(cls, index: int) -> MessagePaths:
        """The paths of ``messages[index]`` in a ``messages`` record.

        Args:
            index: 0-based position of the message.
        """
        at = f"messages[{index}]"
        return cls(f"{at}.role", f"{at}.content", f"{at}.thinking", f"{at}.name")


def detect_format(
    record: Mapping[str, Any], source: str | None = None, *, locator: str | None = None, expected: str | None = None
) -> str:
    """Tell which format a record is in, from its keys.

    ``messages`` wins over ``conversations`` (sharegpt), which wins over ``instruction``/``output`` (alpaca).

    Args:
        record: the raw record.
        source: the file or dataset it came from, for the error message.
        locator: where in the source (``line 3``, ``record 7``), for the error message.
        expected: the format of the file's first record; when given, the record must have the same format.

    Returns:
        One of ``FORMATS``.

    Raises:
        DataError: ``unknown_format`` (listing the keys found and the accepted shapes), ``mixed_formats`` or
            ``not_an_object``.
    """
    if not isinstance(record, Mapping):
        raise DataError(
            problem=f"the record is a {type(record).__name__}, not an object",
            fix=f"use one of the accepted shapes: {ACCEPTED_SHAPES}",
            source=source,
            record=locator,
            reason="not_an_object",
        )
    if "messages" in record:
        fmt = "messages"
    elif "conversations" in record:
        fmt = "sharegpt"
    elif "instruction" in record or "output" in record:
        fmt = "alpaca"
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            problem=f"unrecognised record shape (keys found: {keys})",
            fix=f"use one of the accepted shapes: {ACCEPTED_SHAPES}",
            source=source,
            record=locator,
            reason="unknown_format",
        )
    if expected is not None and fmt != expected:
        raise DataError(
            problem=f"the record is in {fmt} format but the file's first record is in {expected} format",
            fix="use one format per file: convert these records or move them to a file of their own",
            source=source,
            record=locator,
            reason="mixed_formats",
        )
    return fmt


def parse_record(record: Mapping[str, Any], fmt: str, *, source: str = "", index: int = 0) -> Conversation:
    """Parse and validate one record.

    Args:
        record: the raw record.
        fmt: its format, from ``detect_format``.
        source: the file or dataset it came from (stored on the conversation and named in errors).
        index: 0-based position of the record within its source (stored on the conversation).

    Returns:
        The conversation, already checked by ``validate_conversation``.

    Raises:
        DataError: with ``field`` set to the offending value's path and a ``reason`` key; the caller adds the
            line or record number with ``DataError.located``.
        ValueError: for a ``fmt`` that is not one of ``FORMATS``.
    """
    parsers = {"messages": _parse_messages, "alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt}
    if fmt not in parsers:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
    try:
        messages, paths = parsers[fmt](record)
        tools = _parse_tools(record.get("tools"))
        conversation = Conversation(messages=tuple(messages), tools=tools, source=source, index=index)
        validate_conversation(conversation, paths, container=_CONTAINERS[fmt])
    except DataError as err:
        raise err.located(source or None) from None
    return conversation


def validate_conversation(
    conv: Conversation, paths: Sequence[MessagePaths] | None = None, *, container: str = "messages"
) -> None:
    """Check a conversation's contents, whatever format it came from.

    Checks: known roles; string content and reasoning; non-empty content (an assistant turn that makes tool calls
    may have empty content); reasoning and tool calls only on assistant turns; no ``<|channel|>`` tag in content or
    reasoning; at least one assistant turn; every tool message directly after an assistant tool call (or another
    tool message), naming one of the called functions when it names one.

    Args:
        conv: the conversation.
        paths: where each message sits in the original record (defaults to ``messages[i]`` paths).
        container: the record field holding the turns, named when the conversation has no assistant turn.

    Raises:
        DataError: the first problem found, with ``field`` and ``reason`` set.
    """
    called: tuple[str, ...] | None = None
    for i, message in enumerate(conv.messages):
        where = paths[i] if paths is not None else MessagePaths.of_message(i)
        _check_message(message, where)
        if message.role == "tool":
            _check_tool_result(message, where, called)
        elif message.role == "assistant" and message.tool_calls:
            called = tuple(call.name for call in message.tool_calls)
        else:
            called = None
    if not any(message.role == "assistant" for message in conv.messages):
        raise DataError(
            problem="the conversation has no assistant turn, so there is nothing to train on",
            fix="add the assistant's answer",
            field=container,
            reason="no_assistant_turn",
        )


def _check_message(message: Message, where: MessagePaths) -> None:
    if message.role not in ROLES:
        raise DataError(
            problem=f"unknown role {message.role!r}",
            fix=f"use one of: {', '.join(ROLES)}",
            field=where.role,
            reason="unknown_role",
        )
    if not isinstance(message.content, str):
        raise _not_string(message.content, where.content, "content_not_string")
    if message.thinking is not None:
        if not isinstance(message.thinking, str):
            raise _not_string(message.thinking, where.thinking, "thinking_not_string")
        if message.role != "assistant":
            raise DataError(
                problem=f"a {message.role} message has reasoning; only assistant turns can",
                fix="remove the reasoning from this message, or set it to null",
                field=where.thinking,
                reason="thinking_not_assistant",
            )
    if message.tool_calls and message.role != "assistant":
        raise DataError(
            problem=f"a {message.role} message makes tool calls; only assistant turns can",
            fix="move the tool calls to an assistant message",
            field=where.role,
            reason="tool_calls_not_assistant",
        )
    if not message.content.strip() and not (message.role == "assistant" and message.tool_calls):
        raise DataError(
            problem=f"the {message.role} message is empty",
            fix="give the message its text, or remove the record",
            field=where.content,
            reason="empty_content",
        )
    for text, path in ((message.content, where.content), (message.thinking or "", where.thinking)):
        if CHANNEL_TAG in text:
            raise DataError(
                problem=f"the text contains the harmony tag {CHANNEL_TAG}",
                fix="put the reasoning in the message's thinking field and the answer in content, without any "
                "harmony tags; osstune writes the channels itself",
                field=path,
                reason="channel_tag",
            )


def _check_tool_result(message: Message, where: MessagePaths, called: tuple[str, ...] | None) -> None:
    if called is None:
        raise DataError(
            problem="a tool message does not follow an assistant tool call",
            fix="put the assistant message with the matching tool_calls right before the tool results",
            field=where.role,
            reason="tool_without_call",
        )
    if message.name is not None and message.name not in called:
        raise DataError(
            problem=f"the tool message names {message.name!r}, but the preceding call was to {', '.join(called)}",
            fix="make the tool message's name match the function that was called",
            field=where.name or where.role,
            reason="tool_name_mismatch",
        )


def _not_string(value: Any, path: str, reason: str) -> DataError:
    return DataError(
        problem=f"expected a string, got {_type_name(value)}",
        fix=_NOT_STRING_FIX,
        field=path,
        reason=reason,
    )


def _type_name(value: Any, *, empty: bool = False) -> str:
    if isinstance(value, list):
        return "an empty list" if empty and not value else "a list"
    if isinstance(value, Mapping):
        return "an object"
    return "null" if value is None else f"a {type(value).__name__}"


def _required_text(value: Any, path: str) -> str:
    if value is None:
        raise DataError(
            problem="the text is missing",
            fix="add the text, or remove the record",
            field=path,
            reason="missing_content",
        )
    if not isinstance(value, str):
        raise _not_string(value, path, "content_not_string")
    return value


def _optional_text(value: Any, path: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _not_string(value, path, "content_not_string")
    return value


def _split_think(content: str, path: str) -> tuple[str, str | None]:
    """Split a leading ``<think>T</think>C`` block into (C stripped, T stripped); other text is returned as is."""
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        end = stripped.find(THINK_CLOSE)
        if end < 0:
            raise DataError(
                problem=f"the text opens {THINK_OPEN} but never closes it",
                fix=f"close the reasoning with {THINK_CLOSE} before the answer",
                field=path,
                reason="unclosed_think",
            )
        return stripped[end + len(THINK_CLOSE) :].strip(), stripped[len(THINK_OPEN) : end].strip()
    if THINK_CLOSE in content:
        raise DataError(
            problem=f"the text has {THINK_CLOSE} without a leading {THINK_OPEN}",
            fix=f"start the text with {THINK_OPEN}, then the reasoning, then {THINK_CLOSE} and the answer",
            field=path,
            reason="unopened_think",
        )
    return content, None


def _assistant(
    content: str, path: str, thinking: str | None, thinking_path: str, tool_calls: tuple[ToolCall, ...] = ()
) -> tuple[Message, str]:
    """An assistant message with any ``<think>`` block moved to ``thinking``; also returns the thinking path."""
    answer, tagged = _split_think(content, path)
    if tagged is None:
        return Message("assistant", answer, thinking=thinking, tool_calls=tool_calls), thinking_path
    if thinking is not None:
        raise DataError(
            problem=f"the reasoning is given twice: in {thinking_path} and as a {THINK_OPEN} block in the text",
            fix=f"keep one of them: either the field or the {THINK_OPEN} block",
            field=path,
            reason="thinking_twice",
        )
    return Message("assistant", answer, thinking=tagged, tool_calls=tool_calls), path


def _parse_messages(record: Mapping[str, Any]) -> tuple[list[Message], list[MessagePaths]]:
    items = record["messages"]
    if not isinstance(items, list) or not items:
        raise DataError(
            problem=f"messages must be a non-empty list of messages, got {_type_name(items, empty=True)}",
            fix='write "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
            field="messages",
            reason="bad_messages",
        )
    messages: list[Message] = []
    paths: list[MessagePaths] = []
    for i, item in enumerate(items):
        at = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise DataError(
                problem=f"expected a message object, got {_type_name(item)}",
                fix='write each message as {"role": "...", "content": "..."}',
                field=at,
                reason="bad_messages",
            )
        role = _role(item.get("role"), f"{at}.role", ROLES)
        thinking, thinking_path = _thinking_field(item, at)
        tool_calls = _tool_calls(item.get("tool_calls"), f"{at}.tool_calls")
        raw_content = item.get("content")
        if raw_content is None and tool_calls:
            raw_content = ""
        content = _required_text(raw_content, f"{at}.content")
        if role == "assistant":
            message, thinking_path = _assistant(content, f"{at}.content", thinking, thinking_path, tool_calls)
        else:
            name = _optional_text(item.get("name"), f"{at}.name") if role == "tool" else None
            message = Message(role, content, thinking=thinking, tool_calls=tool_calls, name=name)
        messages.append(message)
        paths.append(MessagePaths(f"{at}.role", f"{at}.content", thinking_path, f"{at}.name"))
    return messages, paths


def _role(value: Any, path: str, accepted: Sequence[str]) -> Any:
    if value is None:
        raise DataError(
            problem="the message has no role",
            fix=f"give it one of: {', '.join(accepted)}",
            field=path,
            reason="missing_role",
        )
    if value not in accepted:
        raise DataError(
            problem=f"unknown role {value!r}",
            fix=f"use one of: {', '.join(accepted)}",
            field=path,
            reason="unknown_role",
        )
    return value


def _thinking_field(item: Mapping[str, Any], at: str) -> tuple[str | None, str]:
    present = [key for key in ("thinking", "reasoning_content") if item.get(key) is not None]
    if len(present) == 2:
        raise DataError(
            problem="the reasoning is given twice: in thinking and in reasoning_content",
            fix="keep only one of the two fields",
            field=f"{at}.reasoning_content",
            reason="thinking_twice",
        )
    if not present:
        return None, f"{at}.thinking"
    path = f"{at}.{present[0]}"
    value = item[present[0]]
    if not isinstance(value, str):
        raise _not_string(value, path, "thinking_not_string")
    return value, path


def _tool_calls(value: Any, path: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad_call(path, f"tool_calls must be a list, got {_type_name(value)}")
    calls = []
    for j, call in enumerate(value):
        at = f"{path}[{j}]"
        if not isinstance(call, Mapping):
            raise _bad_call(at, f"expected a tool call object, got {_type_name(call)}")
        kind = call.get("type", "function")
        if kind != "function":
            raise _bad_call(f"{at}.type", f"unsupported tool call type {kind!r}; only function calls are supported")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise _bad_call(f"{at}.function", f"expected the function object, got {_type_name(function)}")
        calls.append(_tool_call(function, f"{at}.function.name", f"{at}.function.arguments"))
    return tuple(calls)


def _tool_call(function: Mapping[str, Any], name_path: str, arguments_path: str) -> ToolCall:
    """A call from ``{"name", "arguments"}``; arguments given as an object are dumped to a JSON string."""
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad_call(name_path, f"the function name must be a non-empty string, got {_type_name(name)}")
    arguments = function.get("arguments")
    if arguments is None:
        return ToolCall(name=name, arguments="{}")
    if isinstance(arguments, Mapping):
        return ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))
    if not isinstance(arguments, str):
        problem = f"arguments must be a JSON object or a JSON string, got {_type_name(arguments)}"
        raise _bad_call(arguments_path, problem)
    try:
        json.loads(arguments)
    except json.JSONDecodeError as err:
        problem = f"arguments is not valid JSON ({err.msg} at character {err.pos + 1})"
        raise _bad_call(arguments_path, problem) from None
    return ToolCall(name=name, arguments=arguments)


def _bad_call(path: str, problem: str, fix: str = _TOOL_CALLS_FIX) -> DataError:
    return DataError(problem=problem, fix=fix, field=path, reason="bad_tool_call")


def _parse_tools(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _bad_tools("tools", f"tools is a string but not valid JSON ({err.msg})") from None
    if not isinstance(value, list):
        raise _bad_tools("tools", f"tools must be a list of function definitions, got {_type_name(value)}")
    tools = []
    for j, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise _bad_tools(f"tools[{j}]", f"expected a function definition object, got {_type_name(tool)}")
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise _bad_tools(f"tools[{j}]", "the function definition has no name")
        tools.append(dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)})
    return tuple(tools)


def _bad_tools(path: str, problem: str) -> DataError:
    return DataError(
        problem=problem,
        fix='write tools in the OpenAI schema: [{"type": "function", "function": {"name": "...", "parameters": {}}}]',
        field=path,
        reason="bad_tools",
    )


def _parse_alpaca(record: Mapping[str, Any]) -> tuple[list[Message], list[MessagePaths]]:
    messages: list[Message] = []
    paths: list[MessagePaths] = []
    system = _optional_text(record.get("system"), "system")
    if system is not None:
        messages.append(Message("system", system))
        paths.append(MessagePaths("system", "system", "system"))
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        problem = f"history must be a list of [question, answer] pairs, got {_type_name(history)}"
        raise _bad_history("history", problem)
    for k, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _bad_history(f"history[{k}]", f"expected a [question, answer] pair, got {_type_name(pair)}")
        question = _required_text(pair[0], f"history[{k}][0]")
        answer = _required_text(pair[1], f"history[{k}][1]")
        messages.append(Message("user", question))
        paths.append(MessagePaths(f"history[{k}]", f"history[{k}][0]", f"history[{k}][0]"))
        message, thinking_path = _assistant(answer, f"history[{k}][1]", None, f"history[{k}][1]")
        messages.append(message)
        paths.append(MessagePaths(f"history[{k}]", f"history[{k}][1]", thinking_path))
    instruction = _optional_text(record.get("instruction"), "instruction")
    extra = _optional_text(record.get("input"), "input")
    query = "\n".join(part for part in (instruction, extra) if part is not None and part.strip())
    if not query and record.get("instruction") is None:
        _required_text(None, "instruction")
    messages.append(Message("user", query))
    paths.append(MessagePaths("instruction", "instruction", "instruction"))
    output = _required_text(record.get("output"), "output")
    message, thinking_path = _assistant(output, "output", None, "output")
    messages.append(message)
    paths.append(MessagePaths("output", "output", thinking_path))
    return messages, paths


def _bad_history(path: str, problem: str) -> DataError:
    return DataError(
        problem=problem,
        fix='write history as [["earlier question", "earlier answer"], ...]',
        field=path,
        reason="bad_history",
    )


def _parse_sharegpt(record: Mapping[str, Any]) -> tuple[list[Message], list[MessagePaths]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(
            problem=f"conversations must be a non-empty list of turns, got {_type_name(turns, empty=True)}",
            fix='write "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]',
            field="conversations",
            reason="bad_messages",
        )
    messages: list[Message] = []
    paths: list[MessagePaths] = []
    system = _optional_text(record.get("system"), "system")
    if system is not None:
        messages.append(Message("system", system))
        paths.append(MessagePaths("system", "system", "system"))
    for j, turn in enumerate(turns):
        at = f"conversations[{j}]"
        if not isinstance(turn, Mapping):
            raise DataError(
                problem=f"expected a turn object, got {_type_name(turn)}",
                fix='write each turn as {"from": "human" | "gpt" | "system" | "tool", "value": "..."}',
                field=at,
                reason="bad_messages",
            )
        source_role = _role(turn.get("from"), f"{at}.from", tuple(SHAREGPT_ROLES))
        role = SHAREGPT_ROLES[source_role]
        value = _required_text(turn.get("value"), f"{at}.value")
        where = MessagePaths(f"{at}.from", f"{at}.value", f"{at}.value")
        if role == "system" and system is not None and j == 0:
            raise DataError(
                problem="the system prompt is given twice: in the top-level system field and as the first turn",
                fix="keep only one of them",
                field="system",
                reason="system_twice",
            )
        if source_role == "function_call":
            message = Message("assistant", "", tool_calls=(_function_call(value, f"{at}.value"),))
        elif role == "assistant":
            message, _ = _assistant(value, f"{at}.value", None, f"{at}.value")
        else:
            message = Message(role, value)
        messages.append(message)
        paths.append(where)
    return messages, paths


def _function_call(value: str, path: str) -> ToolCall:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        problem = f"the function_call value is not valid JSON ({err.msg} at character {err.pos + 1})"
        raise _bad_call(path, problem, _FUNCTION_CALL_FIX) from None
    if not isinstance(call, Mapping):
        problem = f"the function_call value must be a JSON object, got {_type_name(call)}"
        raise _bad_call(path, problem, _FUNCTION_CALL_FIX)
    return _tool_call(call, path, path)
