"""Harmony rendering for gpt-oss: token ids and loss labels, exact to the token.

The rules are those of the model's own chat template (DESIGN §2). One principle decides every loss mask: a trained
token stream is exactly what the model reads and writes at inference. The context of an assistant turn is the
generation-prompt rendering (:func:`render_prompt`) of the messages before it, and its targets are what the model
generates after ``<|start|>assistant`` for that turn, ending in ``<|return|>`` (final answer) or ``<|call|>``
(tool call). Because the template drops reasoning from earlier turns, it is not prefix-preserving, so one
conversation may become several samples.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from osstune.chat.messages import ROLES, Conversation, Message, ToolCall
from osstune.chat.options import IGNORE_INDEX, REASONING_EFFORTS, RenderOptions, Sample
from osstune.chat.tokenizer import HarmonyTokens, harmony_tokens
from osstune.errors import DataError, OsstuneError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
TOOLS_CHANNEL_LINE = "\nCalls to these tools must go to the commentary channel: 'functions'."

# Indentation that the gpt-oss template leaks into nested TypeScript types (its whitespace control misses these).
_NESTED_PROPERTY_INDENT = " " * 16
_ONE_OF_DEFAULT_INDENT = " " * 20

# How many distinct developer texts a codec keeps encoded.
_REPEATED_TEXT_MEMO = 256

# A piece of a token stream: a special token id, text to encode as ordinary text, or ids encoded already.
_Piece = int | str | tuple[int, ...]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def render_training_samples(conv: Conversation, tokenizer: Any, options: RenderOptions) -> list[Sample]:
    """Render one conversation into training samples with exact loss labels.

    Samples per ``options.loss_scale``:

    - ``default``: every assistant turn is trained once. Tool-call turns and final answers without reasoning are
      trained in place inside a later sample; a final answer that is not the last turn gets its own sample when
      it has reasoning (or when a tool call before it has reasoning, which the template drops once a final answer
      follows); the last assistant turn ends the last sample. Messages after the last assistant turn are dropped.
    - ``last_round``: one sample; only the last assistant turn is trained.
    - ``all``: the samples of ``default``, with every token trained.
    - ``ignore_empty_think``: like ``default``, but empty or whitespace-only reasoning is rendered as no analysis
      message at all.

    Args:
        conv: the conversation.
        tokenizer: a fast harmony tokenizer (o200k_harmony or one with the same special token strings).
        options: date, reasoning effort, model identity, default instructions and loss policy.

    Returns:
        The samples, in conversation order.

    Raises:
        DataError: the conversation cannot be rendered (see :func:`render_prompt`), or it has no assistant turn.
        OsstuneError: an unknown reasoning effort, or a tokenizer without the harmony special tokens.
    """
    codec = _codec(tokenizer)
    prepared = _prepare(conv.messages, conv.tools, options)
    turns = prepared.turns
    assistant = [i for i, turn in enumerate(turns) if turn.role == "assistant"]
    if not assistant:
        raise DataError(
            problem="the conversation has no assistant turn, so there is nothing to train",
            fix="add an assistant reply or remove the record",
            field="messages",
            reason="no_assistant",
        )
    ends = [assistant[-1]] if options.loss_scale == "last_round" else _sample_ends(turns, assistant)
    plans = []
    start = -1
    for end in ends:
        in_place = () if options.loss_scale == "last_round" else range(start + 1, end)
        plans.append(_render(codec, prepared, options, end, in_place=frozenset(in_place), target=True))
        start = end
    encoded = codec.encode_texts(plans)
    train_all = options.loss_scale == "all"
    return [_assemble(plan, encoded, train_all) for plan in plans]


def render_prompt(
    messages: Sequence[Message],
    tokenizer: Any,
    options: RenderOptions,
    tools: Sequence[dict[str, Any]] = (),
) -> list[int]:
    """The inference prompt: ``messages`` as the model's template renders them, then ``<|start|>assistant``.

    Args:
        messages: the conversation so far (system/developer only as the first message).
        tokenizer: a fast harmony tokenizer.
        options: date, reasoning effort, model identity and default instructions; of the loss policies only
            ``ignore_empty_think`` matters here (blank reasoning of a tool call is then no analysis message, as in
            training).
        tools: function definitions in the OpenAI ``tools`` schema (``{"type": "function", "function": {...}}``
            or the bare function object).

    Returns:
        The prompt token ids.

    Raises:
        DataError: a system/developer message after the first message, ``<|channel|>`` tags in a text, more than
            one tool call in one assistant turn, both reasoning and content in a tool-call turn, a tool result with
            no tool call before it, or malformed tool definitions.
        OsstuneError: an unknown reasoning effort, or a tokenizer without the harmony special tokens.
    """
    codec = _codec(tokenizer)
    prepared = _prepare(tuple(messages), tuple(tools), options)
    plan = _render(codec, prepared, options, len(prepared.turns), in_place=frozenset(), target=False)
    return _assemble(plan, codec.encode_texts([plan]), False).input_ids


def render_functions_namespace(tools: Sequence[dict[str, Any]]) -> str:
    """The ``## functions`` TypeScript-like namespace of the developer message, as gpt-oss's template writes it.

    Reproduces the template's output exactly, including its quirks: nested object properties carry a newline and
    16 spaces before their type, ``oneOf`` alternatives are joined by ``" | \\n"`` and a ``oneOf`` default is
    preceded by 20 spaces. A tool without a description gets no ``//`` line (the template would fail on it;
    openai-harmony omits the line).

    Args:
        tools: function definitions, each ``{"name", "description"?, "parameters"?}`` (already unwrapped from
            ``{"type": "function", "function": ...}``).

    Returns:
        The namespace text, from ``## functions`` to ``} // namespace functions``.
    """
    out = ["## functions\n\n", "namespace functions {\n\n"]
    for tool in tools:
        description = tool.get("description")
        if description is not None:
            out.append(f"// {description}\n")
        out.append(f"type {tool['name']} = ")
        parameters = tool.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not (parameters and properties):
            out.append("() => any;\n\n")
            continue
        out.append("(_: {\n")
        required = parameters.get("required") or []
        for name, spec in properties.items():
            spec_dict = spec if isinstance(spec, dict) else {}
            if spec_dict.get("description"):
                out.append(f"// {spec_dict['description']}\n")
            line = f"{name}{'' if name in required else '?'}: {_typescript_type(spec)}"
            if "default" in spec_dict:
                default = spec_dict["default"]
                if spec_dict.get("enum"):
                    line += f", // default: {default}"
                elif spec_dict.get("oneOf"):
                    line += f"// default: {default}"
                else:
                    line += f", // default: {_tojson(default)}"
            out.append(line + ",\n")
        out.append("}) => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Turn:
    """A validated non-system message with what rendering needs.

    Args:
        role: ``user``, ``assistant`` or ``tool``.
        content: the message text (for a tool result, already JSON-encoded as the template does).
        analysis: assistant reasoning to render as an analysis message, ``None`` for none. For a tool-call turn
            it is the reasoning or, failing that, the content (the template's rule).
        call: the tool call of an assistant tool-call turn.
        tool_name: for a tool result, the function it answers.
    """

    role: str
    content: str
    analysis: str | None = None
    call: ToolCall | None = None
    tool_name: str | None = None

    @property
    def is_final(self) -> bool:
        """An assistant turn that answers (not a tool call)."""
        return self.role == "assistant" and self.call is None


@dataclass(frozen=True)
class _Prepared:
    """A validated conversation: developer text, the remaining turns, and the unwrapped tool definitions."""

    developer: str | None
    turns: tuple[_Turn, ...]
    tools: tuple[dict[str, Any], ...]


def _prepare(messages: Sequence[Message], tools: Sequence[dict[str, Any]], options: RenderOptions) -> _Prepared:
    """Validate messages and tools and resolve what the template infers (developer text, tool names)."""
    if options.reasoning_effort not in REASONING_EFFORTS:
        raise OsstuneError(
            f"reasoning effort {options.reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}"
        )
    developer = options.system
    body = list(enumerate(messages))
    if body and body[0][1].role in ("system", "developer"):
        developer = body[0][1].content or options.system
        _check_channel_tags(body[0][1], 0)
        body = body[1:]
    turns = []
    last_call: str | None = None
    ignore_empty = options.loss_scale == "ignore_empty_think"
    for index, message in body:
        _check_channel_tags(message, index)
        if message.role in ("system", "developer"):
            raise DataError(
                problem=f"a {message.role} message appears at position {index}; gpt-oss takes instructions "
                "only from the first message (its template would drop this one silently)",
                fix="merge it into the first system message, or make it a user message",
                field=f"messages[{index}].role",
                reason="misplaced_system",
            )
        if message.role == "user":
            turns.append(_Turn("user", message.content))
        elif message.role == "assistant":
            thinking = message.thinking
            if ignore_empty and thinking is not None and not thinking.strip():
                thinking = None
            if not message.tool_calls:
                turns.append(_Turn("assistant", message.content, analysis=thinking))
                last_call = None
                continue
            if len(message.tool_calls) > 1:
                raise DataError(
                    problem=f"an assistant turn makes {len(message.tool_calls)} tool calls; gpt-oss makes one "
                    "call per message",
                    fix="split the calls into consecutive assistant turns, each followed by its tool result",
                    field=f"messages[{index}].tool_calls",
                    reason="multiple_tool_calls",
                )
            if thinking and message.content:
                raise DataError(
                    problem="a tool-call turn has both reasoning and content; gpt-oss renders one of them as the "
                    "analysis before the call",
                    fix="keep the reasoning in `thinking` and leave `content` empty, or merge them",
                    field=f"messages[{index}].content",
                    reason="tool_call_content_and_thinking",
                )
            call = message.tool_calls[0]
            turns.append(_Turn("assistant", "", analysis=thinking or message.content or None, call=call))
            last_call = call.name
        elif message.role == "tool":
            if last_call is None:
                raise DataError(
                    problem="a tool result has no assistant tool call before it",
                    fix="put the assistant turn with the matching tool call before the tool result",
                    field=f"messages[{index}]",
                    reason="orphan_tool_result",
                )
            name = message.name or last_call
            turns.append(_Turn("tool", _tojson(message.content), tool_name=name))
        else:
            raise DataError(
                problem=f"unknown role {message.role!r}",
                fix=f"use one of {', '.join(ROLES)}",
                field=f"messages[{index}].role",
                reason="unknown_role",
            )
    return _Prepared(developer or None, tuple(turns), _unwrap_tools(tools))


def _check_channel_tags(message: Message, index: int) -> None:
    """Refuse harmony channel tags inside message text (a sign of unparsed raw harmony output)."""
    for name in ("content", "thinking"):
        text = getattr(message, name)
        if text is not None and "<|channel|>" in text:
            raise DataError(
                problem="the text contains <|channel|> tags, i.e. raw harmony output that was not split into "
                "reasoning and answer",
                fix="put the analysis text in `thinking` and the final text in `content`, without harmony tags",
                field=f"messages[{index}].{name}",
                reason="channel_tags",
            )


def _unwrap_tools(tools: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Accept ``{"type": "function", "function": {...}}`` or the bare function object; require a name."""
    out = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(
                problem="a tool definition has no function name",
                fix='use the OpenAI schema: {"type": "function", "function": {"name", "description", "parameters"}}',
                field=f"tools[{index}]",
                reason="invalid_tools",
            )
        out.append(function)
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Rendering plans
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A token stream before encoding: pieces and, for each, whether it is trained."""

    pieces: list[_Piece]
    trained: list[bool]


def _sample_ends(turns: Sequence[_Turn], assistant: Sequence[int]) -> list[int]:
    """Indices of the assistant turns that end a sample under the per-turn policies.

    A final answer that is not the last turn ends its own sample when training it in place (inside a later
    sample) would not reproduce what the model saw and wrote: when it has reasoning (the later sample drops it),
    or when a tool call since the previous final answer has reasoning (the later sample drops that too, which
    changes this answer's context).
    """
    ends = []
    call_reasoning = False
    for index in assistant[:-1]:
        turn = turns[index]
        if turn.call is not None:
            call_reasoning = call_reasoning or turn.analysis is not None
            continue
        if turn.analysis is not None or call_reasoning:
            ends.append(index)
        call_reasoning = False
    ends.append(assistant[-1])
    return ends


def _render(
    codec: _Codec,
    prepared: _Prepared,
    options: RenderOptions,
    end: int,
    in_place: frozenset[int],
    target: bool,
) -> _Plan:
    """Plan the stream of ``turns[:end]`` as context, then either the generation prompt alone (``target`` False)
    or the generation prompt and turn ``end`` as the trained target."""
    tok = codec.tokens
    turns = prepared.turns
    plan = _Plan([codec.system_ids(options, bool(prepared.tools))], [False])
    if prepared.developer or prepared.tools:
        text = f"# Instructions\n\n{prepared.developer}\n\n" if prepared.developer else ""
        if prepared.tools:
            text += "# Tools\n\n" + render_functions_namespace(prepared.tools)
        _add(plan, False, tok.start, "developer", tok.message, codec.repeated_text_ids(text), tok.end)
    next_final = _next_final(turns, end)
    for index in range(end):
        turn = turns[index]
        trained = index in in_place
        if turn.role == "user":
            _add(plan, False, tok.start, "user", tok.message, turn.content, tok.end)
        elif turn.role == "tool":
            header = f"functions.{turn.tool_name} to=assistant"
            _add(plan, False, tok.start, header, tok.channel, "commentary", tok.message, turn.content, tok.end)
        elif turn.call is not None:
            _add(plan, False, tok.start, "assistant")
            _add_call(plan, tok, turn, keep_analysis=next_final[index] >= end, trained=trained)
        else:
            _add(plan, False, tok.start, "assistant")
            _add(plan, trained, tok.channel, "final", tok.message, turn.content)
            _add(plan, False, tok.end)
    _add(plan, False, tok.start, "assistant")
    if target:
        turn = turns[end]
        if turn.call is not None:
            _add_call(plan, tok, turn, keep_analysis=True, trained=True)
        else:
            _add_analysis(plan, tok, turn.analysis, trained=True)
            _add(plan, True, tok.channel, "final", tok.message, turn.content, tok.return_)
    return plan


def _next_final(turns: Sequence[_Turn], end: int) -> list[int]:
    """For each index below ``end``, the index of the next final answer in ``turns[:end]`` (``end`` if none)."""
    out = [end] * end
    upcoming = end
    for index in range(end - 1, -1, -1):
        out[index] = upcoming
        if turns[index].is_final:
            upcoming = index
    return out


def _add_call(plan: _Plan, tok: HarmonyTokens, turn: _Turn, keep_analysis: bool, trained: bool) -> None:
    """What the model writes after ``<|start|>assistant`` for a tool call (its analysis only when kept)."""
    assert turn.call is not None
    if keep_analysis:
        _add_analysis(plan, tok, turn.analysis, trained)
    recipient = f" to=functions.{turn.call.name}"
    _add(plan, trained, recipient, tok.channel, "commentary json", tok.message, turn.call.arguments, tok.call)


def _add_analysis(plan: _Plan, tok: HarmonyTokens, analysis: str | None, trained: bool) -> None:
    """An analysis message written right after a ``<|start|>assistant`` header, then the next header opened."""
    if analysis is not None:
        _add(plan, trained, tok.channel, "analysis", tok.message, analysis, tok.end, tok.start, "assistant")


def _add(plan: _Plan, trained: bool, *pieces: _Piece) -> None:
    """Append pieces that share one trained flag."""
    plan.pieces.extend(pieces)
    plan.trained.extend([trained] * len(pieces))


def _assemble(plan: _Plan, encoded: dict[str, list[int]], train_all: bool) -> Sample:
    """Turn a plan into ids and labels, using the batch-encoded texts."""
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, trained in zip(plan.pieces, plan.trained):
        if isinstance(piece, int):
            ids: Sequence[int] = (piece,)
        elif isinstance(piece, str):
            ids = encoded[piece]
        else:
            ids = piece
        input_ids.extend(ids)
        if trained or train_all:
            labels.extend(ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    return Sample(input_ids=input_ids, labels=labels)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer access
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Codec:
    """Per-tokenizer state: the special ids, an encoder that treats special-token text as ordinary text, and the
    ids of the system and developer messages, which recur across a dataset."""

    tokens: HarmonyTokens
    ordinary: Tokenizer
    _systems: dict[tuple[str, str, str, bool], tuple[int, ...]] = field(default_factory=dict)
    _repeated: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def encode_texts(self, plans: Sequence[_Plan]) -> dict[str, list[int]]:
        """Encode every distinct text of the plans in one batch call, as ordinary text (no special tokens)."""
        texts = list({piece: None for plan in plans for piece in plan.pieces if isinstance(piece, str)})
        encodings = self.ordinary.encode_batch(texts, add_special_tokens=False)
        return {text: encoding.ids for text, encoding in zip(texts, encodings)}

    def repeated_text_ids(self, text: str) -> tuple[int, ...]:
        """Ids of a text that recurs across a dataset (developer instructions and tool definitions), memoised;
        the memo is emptied when it reaches ``_REPEATED_TEXT_MEMO`` entries."""
        cached = self._repeated.get(text)
        if cached is None:
            if len(self._repeated) >= _REPEATED_TEXT_MEMO:
                self._repeated.clear()
            cached = tuple(self.ordinary.encode(text, add_special_tokens=False).ids)
            self._repeated[text] = cached
        return cached

    def system_ids(self, options: RenderOptions, has_tools: bool) -> tuple[int, ...]:
        """The ids of the whole system message (``<|start|>system ... <|end|>``), computed once per setting."""
        key = (options.model_identity, options.current_date, options.reasoning_effort, has_tools)
        cached = self._systems.get(key)
        if cached is None:
            text = (
                f"{options.model_identity}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\n"
                f"Current date: {options.current_date}\n\nReasoning: {options.reasoning_effort}\n\n"
                f"{VALID_CHANNELS_LINE}{TOOLS_CHANNEL_LINE if has_tools else ''}"
            )
            tok = self.tokens
            plan = _Plan([tok.start, "system", tok.message, text, tok.end], [False] * 5)
            cached = tuple(_assemble(plan, self.encode_texts([plan]), False).input_ids)
            self._systems[key] = cached
        return cached


@functools.lru_cache(maxsize=8)
def _codec(tokenizer: Any) -> _Codec:
    """The codec of a tokenizer, built once per tokenizer object (a small cache keyed by object identity)."""
    from tokenizers import Tokenizer

    tokens = harmony_tokens(tokenizer)
    if tokens is None:
        raise OsstuneError(
            f"{getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} has no harmony special tokens "
            "(<|start|>, <|message|>, ...); use the generic chat-template path for non-gpt-oss models"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OsstuneError("harmony rendering needs a fast tokenizer (tokenizer.json); load it with use_fast=True")
    # Same BPE model and pre-tokenization, but no added tokens: "<|end|>" typed in a message stays text.
    ordinary = Tokenizer(backend.model)
    ordinary.normalizer = backend.normalizer
    ordinary.pre_tokenizer = backend.pre_tokenizer
    return _Codec(tokens=tokens, ordinary=ordinary)


# --------------------------------------------------------------------------------------------------------------
# Tool schema rendering (gpt-oss template's render_typescript_type)
# --------------------------------------------------------------------------------------------------------------


def _typescript_type(spec: Any) -> str:
    """The TypeScript-like type of one JSON-schema node, as the gpt-oss template renders it."""
    if not isinstance(spec, dict):
        return "any"
    kind = spec.get("type")
    nullable = " | null" if spec.get("nullable") else ""
    if kind == "array":
        items = spec.get("items")
        if not items:
            return "any[]" + nullable
        item_kind = items.get("type") if isinstance(items, dict) else None
        if item_kind in ("string", "boolean"):
            return f"{item_kind}[]{nullable}"
        if item_kind in ("number", "integer"):
            return f"number[]{nullable}"
        inner = _typescript_type(items)
        return ("any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]") + nullable
    if isinstance(kind, list) and kind:
        return " | ".join(str(part) for part in kind)
    one_of = spec.get("oneOf")
    if one_of:
        parts = []
        for position, variant in enumerate(one_of):
            text = _typescript_type(variant)
            if isinstance(variant, dict) and variant.get("description"):
                text += f"// {variant['description']}"
            if isinstance(variant, dict) and "default" in variant:
                text += f"{_ONE_OF_DEFAULT_INDENT}// default: {_tojson(variant['default'])}"
            if position < len(one_of) - 1:
                text += " | \n"
            parts.append(text)
        return "".join(parts)
    if kind == "string":
        enum = spec.get("enum")
        if enum:
            return '"' + '" | "'.join(str(value) for value in enum) + '"'
        return "string" + nullable
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "object":
        properties = spec.get("properties")
        if not properties:
            return "object"
        required = spec.get("required") or []
        fields = [
            f"{name}{'' if name in required else '?'}: \n{_NESTED_PROPERTY_INDENT}{_typescript_type(value)}"
            for name, value in properties.items()
        ]
        return "{\n" + ", ".join(fields) + "}"
    return "any"


def _tojson(value: Any) -> str:
    """JSON as the chat template's ``tojson`` filter writes it (transformers: non-ASCII kept, default separators)."""
    return json.dumps(value, ensure_ascii=False)
