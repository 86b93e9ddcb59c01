"""Generation with the training renderer's prompt, and parsing of harmony completions.

The prompt is :func:`osstune.chat.render.render_prompt`, the very function whose output is the context of every
trained turn, so inference sees exactly what training showed the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from osstune.chat.messages import Message, ToolCall
from osstune.chat.options import RenderOptions
from osstune.chat.render import render_prompt
from osstune.chat.tokenizer import harmony_tokens

RECIPIENT = re.compile(r"\bto=(functions\.[^\s<]+)")
CHANNEL = re.compile(r"^\s*(\w+)")


@dataclass
class Reply:
    """A parsed assistant reply.

    Args:
        reasoning: the analysis channel text ("" when the model gave none).
        final: the final answer ("" when the reply ended in a tool call or was cut off).
        tool_calls: function calls the model made.
        token_ids: the generated ids, stop token included.
        finished: whether generation ended on a stop token (rather than the token budget).
    """

    reasoning: str = ""
    final: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that always end an assistant turn: ``<|return|>`` and ``<|call|>`` for harmony, else EOS.

    ``<|end|>`` ends a turn too, except after an analysis message, where the model goes on with its answer; see
    :class:`HarmonyStop`.
    """
    tok = harmony_tokens(tokenizer)
    if tok is not None:
        return [tok.return_, tok.call]
    return [tokenizer.eos_token_id]


def closes_analysis(tokenizer: Any, tok: Any, generated: Sequence[int]) -> bool:
    """Whether the message being generated last (after the last ``<|start|>``) is on the analysis channel.

    Args:
        tokenizer: a harmony tokenizer.
        tok: its :class:`~osstune.chat.tokenizer.HarmonyTokens`.
        generated: the generated ids so far (the first message has no ``<|start|>``: it follows the prompt's).
    """
    start = max((i for i, t in enumerate(generated) if t == tok.start), default=-1) + 1
    header = list(generated[start:])
    header = header[: header.index(tok.message)] if tok.message in header else header
    channel = tokenizer.decode(header, skip_special_tokens=False).split("<|channel|>")[-1]
    return channel.strip().startswith("analysis")


class HarmonyStop(StoppingCriteria):
    """Stops a row on ``<|return|>`` or ``<|call|>``, and on ``<|end|>`` unless it closes an analysis message.

    Args:
        tokenizer: a harmony tokenizer.
        prompt_length: length of the (left-padded) prompt; only generated tokens are inspected.
    """

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.tok, self.prompt_length = tokenizer, harmony_tokens(tokenizer), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tok = self.tok
        last = input_ids[:, -1]
        done = (last == tok.return_) | (last == tok.call)
        for row in torch.nonzero(last == tok.end).flatten().tolist():
            done[row] = not closes_analysis(self.tokenizer, tok, input_ids[row, self.prompt_length:].tolist())
        return done


class TokenCallbackStreamer(BaseStreamer):
    """Hands each generated token id to a callback as soon as ``generate`` picks it (one row; the prompt is skipped).

    Args:
        callback: called with every new token id, the stop token included.
    """

    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (the first call, ignored) or the next token from ``generate``.

        Args:
            value: token ids; the prompt on the first call, then one new id per step.
        """
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.callback(int(token))

    def end(self) -> None:
        """Called by ``generate`` when it is done; every token was already passed on."""


def parse_completion(tokenizer: Any, ids: Sequence[int]) -> Reply:
    """Split generated harmony tokens (what follows ``<|start|>assistant``) into reasoning, answer and calls.

    Args:
        tokenizer: a harmony tokenizer.
        ids: the generated ids; generation may have stopped at ``<|end|>`` after an analysis message.
    """
    tok = harmony_tokens(tokenizer)
    reply = Reply(token_ids=list(ids))
    if tok is None:
        reply.final = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
        reply.finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
        return reply
    reply.finished = bool(ids) and ids[-1] in (tok.return_, tok.end, tok.call)
    # Messages are separated by <|start|>; each is HEADER <|message|> CONTENT [stop].
    message: list[int] = []
    for token in [*ids, tok.start]:
        if token == tok.start:
            if message:
                _add_message(tokenizer, tok, message, reply)
            message = []
        else:
            message.append(token)
    return reply


def _add_message(tokenizer: Any, tok: Any, ids: list[int], reply: Reply) -> None:
    if tok.message not in ids:
        return
    cut = ids.index(tok.message)
    header = tokenizer.decode(ids[:cut], skip_special_tokens=False)
    body = [t for t in ids[cut + 1:] if t not in (tok.return_, tok.end, tok.call)]
    content = tokenizer.decode(body, skip_special_tokens=False)
    recipient = RECIPIENT.search(header)
    channel_text = header.split("<|channel|>", 1)[1] if "<|channel|>" in header else ""
    channel = (CHANNEL.match(channel_text).group(1) if CHANNEL.match(channel_text) else "")
    if recipient:
        reply.tool_calls.append(ToolCall(name=recipient.group(1).removeprefix("functions."), arguments=content))
    elif channel == "analysis":
        reply.reasoning += content
    else:
        reply.final += content


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    options: RenderOptions,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: Sequence[Sequence[dict[str, Any]]] | None = None,
    max_context: int | None = None,
    streamer: BaseStreamer | None = None,
) -> list[Reply]:
    """Answer several conversations in one left-padded batch (greedy when ``temperature`` is 0).

    Each row stops on its own (see :class:`HarmonyStop`); rows that finished early are padded, and their padding
    is cut before parsing.

    Args:
        model: a causal LM (a PEFT model included).
        tokenizer: its tokenizer.
        conversations: one message list per row, each ending with the user's turn.
        options: rendering options.
        max_new_tokens: generation budget per row.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (with temperature > 0).
        tools: function definitions per row, if any.
        max_context: the model's context length; a prompt that leaves no room to generate is an error.
        streamer: a transformers streamer that receives tokens as they are generated (one conversation only).

    Raises:
        OsstuneError: a prompt longer than ``max_context - 1`` tokens.
    """
    from osstune.errors import OsstuneError

    prompts = [render_prompt(msgs, tokenizer, options, (tools[i] if tools else ())) for i, msgs in
               enumerate(conversations)]
    if max_context is not None:
        for i, prompt in enumerate(prompts):
            if len(prompt) >= max_context:
                raise OsstuneError(f"prompt {i} has {len(prompt):,} tokens, but the model's context is "
                                   f"{max_context:,}: shorten the conversation or its system message.")
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad = stops[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    criteria = StoppingCriteriaList([HarmonyStop(tokenizer, width)]) if harmony_tokens(tokenizer) else None
    budget = max_new_tokens if max_context is None else min(max_new_tokens, max_context - width)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                             eos_token_id=stops, pad_token_id=pad, use_cache=True, stopping_criteria=criteria,
                             streamer=streamer, **sampling)
    finally:
        model.train(was_training)
    replies = []
    for row in out[:, width:].tolist():
        replies.append(parse_completion(tokenizer, _until_stop(row, tokenizer)))
    return replies


def _until_stop(row: list[int], tokenizer: Any) -> list[int]:
    """A generated row up to and including its stop token (what follows is padding)."""
    tok = harmony_tokens(tokenizer)
    if tok is None:
        eos = tokenizer.eos_token_id
        return row[: row.index(eos) + 1] if eos in row else row
    for i, token in enumerate(row):
        if token in (tok.return_, tok.call):
            return row[: i + 1]
        if token == tok.end and not closes_analysis(tokenizer, tok, row[:i]):
            return row[: i + 1]
    return row


def generate(
    model: Any,
    tokenizer: Any,
    messages: Sequence[Message],
    options: RenderOptions,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: Sequence[dict[str, Any]] = (),
    max_context: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Reply:
    """Answer the conversation ``messages`` (greedy when ``temperature`` is 0); see :func:`generate_batch`.

    Args:
        model: a causal LM (a PEFT model included).
        tokenizer: its tokenizer.
        messages: the conversation so far, ending with the user's turn.
        options: rendering options.
        max_new_tokens: generation budget.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (with temperature > 0).
        tools: function definitions offered to the model.
        max_context: the model's context length; a prompt that leaves no room to generate is an error.
        on_token: called with each generated token id as soon as it exists (for streaming output).
    """
    streamer = TokenCallbackStreamer(on_token) if on_token is not None else None
    return generate_batch(model, tokenizer, [messages], options, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, tools=[tools], max_context=max_context,
                          streamer=streamer)[0]
