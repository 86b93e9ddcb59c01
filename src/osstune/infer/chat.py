"""Interactive terminal chat: ``osstune infer`` without ``--val_dataset``.

The conversation is kept as :class:`~osstune.chat.messages.Message` objects and rendered by the training renderer
for every turn (so earlier reasoning is dropped exactly as the model's template drops it). Replies are parsed into
reasoning, final answer and tool calls; with streaming on, the harmony headers are tracked as tokens arrive so that
the reasoning is shown dimmed under a ``thinking`` label, apart from the answer.

The loop reads lines from any iterable (a pipe, a file, a list in tests) or from the terminal, and writes to a rich
``Console``, so it runs without a TTY.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from rich.console import Console

from osstune.chat.messages import Message
from osstune.chat.options import REASONING_EFFORTS, RenderOptions
from osstune.chat.tokenizer import harmony_tokens
from osstune.errors import OsstuneError
from osstune.infer.generate import CHANNEL, RECIPIENT, Reply, generate

PieceKind = Literal["reasoning", "final", "tool_call"]

PROMPT = "[bold green]you>[/] "
HELP = ("commands: /clear forgets the conversation, /reasoning low|medium|high sets the reasoning effort, "
        "/exit (or Ctrl-D) quits")
LABELS = MappingProxyType({
    "reasoning": ("thinking", "dim bold"),
    "final": ("assistant", "bold cyan"),
    "tool_call": ("tool call", "bold yellow"),
})
"""Kind of output -> (label printed when a message of that kind starts, label style)."""
TEXT_STYLES = MappingProxyType({"reasoning": "dim italic", "final": None, "tool_call": "yellow"})
"""Kind of output -> style of its text."""
EXIT_COMMANDS = ("exit", "quit")


@dataclass(frozen=True)
class StreamPiece:
    """New text of one message of a reply.

    Args:
        message: 0-based number of the message within the reply; a new number starts a new message.
        kind: ``reasoning`` (analysis channel), ``final`` (the answer) or ``tool_call`` (a call's arguments).
        text: the text that just arrived.
        name: the called function (without ``functions.``) for ``tool_call`` pieces.
    """

    message: int
    kind: PieceKind
    text: str
    name: str | None = None


class StreamSplitter:
    """Turns generated token ids, one at a time, into :class:`StreamPiece` objects.

    Harmony output is a sequence of messages ``HEADER <|message|> BODY`` separated by ``<|start|>`` and ended by
    ``<|end|>``, ``<|return|>`` or ``<|call|>``; the header names the channel (``analysis`` is reasoning) and, for a
    tool call, the recipient ``to=functions.NAME``. Header tokens are held until ``<|message|>`` decides the kind of
    the body; body text is released as soon as it decodes to whole characters. The pieces joined per kind equal
    what :func:`osstune.infer.generate.parse_completion` makes of the same tokens. A tokenizer without harmony
    tokens streams everything as the answer.

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tok = harmony_tokens(tokenizer)
        self.message = 0
        self.in_header = self.tok is not None
        self.header: list[int] = []
        self.body: list[int] = []
        self.kind: PieceKind = "final"
        self.name: str | None = None
        self.shown = 0

    def feed(self, token: int) -> list[StreamPiece]:
        """Take the next generated token; return the text it completes (often none, sometimes one piece).

        Args:
            token: the token id.
        """
        tok = self.tok
        if tok is not None and token in (tok.start, tok.end, tok.return_, tok.call):
            return self._close()
        if self.in_header:
            if tok is not None and token == tok.message:
                self._open()
            else:
                self.header.append(token)
            return []
        self.body.append(token)
        return self._pieces(final=False)

    def flush(self) -> list[StreamPiece]:
        """The text still held back when generation ends (e.g. a character cut off by the token budget)."""
        return self._close() if self.tok is not None else self._pieces(final=True)

    def _open(self) -> None:
        """Decide the kind of the message whose header is complete."""
        header = self.tokenizer.decode(self.header, skip_special_tokens=False)
        recipient = RECIPIENT.search(header)
        channel = CHANNEL.match(header.split("<|channel|>", 1)[1]) if "<|channel|>" in header else None
        if recipient:
            self.kind, self.name = "tool_call", recipient.group(1).removeprefix("functions.")
        else:
            self.kind = "reasoning" if channel and channel.group(1) == "analysis" else "final"
            self.name = None
        self.in_header, self.body, self.shown = False, [], 0

    def _close(self) -> list[StreamPiece]:
        """End the current message (if its body started) and get ready for the next header."""
        pieces: list[StreamPiece] = []
        if not self.in_header:
            pieces = self._pieces(final=True)
            self.message += 1
        self.in_header, self.header, self.body, self.shown = True, [], [], 0
        return pieces

    def _pieces(self, final: bool) -> list[StreamPiece]:
        """The body text not shown yet; held back while it ends in a partial character, unless ``final``."""
        text = self.tokenizer.decode(self.body, skip_special_tokens=self.tok is None)
        if not final and text.endswith("\ufffd"):
            return []
        new, self.shown = text[self.shown:], len(text)
        return [StreamPiece(self.message, self.kind, new, self.name)] if new else []


def reply_pieces(reply: Reply) -> list[StreamPiece]:
    """A whole reply as pieces, in the order a stream shows them: reasoning, answer, tool calls.

    Args:
        reply: the parsed reply.
    """
    pieces = []
    if reply.reasoning:
        pieces.append(StreamPiece(len(pieces), "reasoning", reply.reasoning))
    if reply.final:
        pieces.append(StreamPiece(len(pieces), "final", reply.final))
    for call in reply.tool_calls:
        pieces.append(StreamPiece(len(pieces), "tool_call", call.arguments, call.name))
    return pieces


class ReplyPrinter:
    """Writes pieces to a console: a label line when a message starts, then its text as it arrives.

    Args:
        console: where to write.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.current: int | None = None

    def show(self, piece: StreamPiece) -> None:
        """Write one piece (its label first when it opens a message).

        Args:
            piece: the piece.
        """
        if piece.message != self.current:
            if self.current is not None:
                self.console.print()
            label, style = LABELS[piece.kind]
            self.console.print(f"{label} functions.{piece.name}" if piece.name else label, style=style,
                               markup=False, highlight=False)
            self.current = piece.message
        self.console.print(piece.text, style=TEXT_STYLES[piece.kind], end="", markup=False, highlight=False,
                           soft_wrap=True)

    def close(self) -> None:
        """End the last line of the reply."""
        if self.current is not None:
            self.console.print()
            self.current = None


def assistant_message(reply: Reply) -> Message:
    """The history entry for a reply: answer and reasoning, or the tool call with its reasoning.

    Args:
        reply: the parsed reply.
    """
    if reply.tool_calls:
        return Message("assistant", "", thinking=reply.reasoning or reply.final or None,
                       tool_calls=(reply.tool_calls[0],))
    return Message("assistant", reply.final, thinking=reply.reasoning or None)


@dataclass(frozen=True)
class ChatSettings:
    """How the chat generates.

    Args:
        stream: show tokens as they are generated (else the whole reply at the end).
        max_new_tokens: generation budget per reply.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (with temperature > 0).
        max_context: the model's context length; a conversation that outgrows it is an error.
    """

    stream: bool = True
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    max_context: int | None = None


@dataclass
class ChatSession:
    """A conversation with a model: the history, the rendering options and the slash commands.

    Args:
        model: the model (a PEFT model included), in eval mode.
        tokenizer: its tokenizer.
        options: rendering options (date, reasoning effort, identity, default system message).
        settings: generation settings.
        console: where replies and messages are written.
        history: the conversation so far (user and assistant turns).
    """

    model: Any
    tokenizer: Any
    options: RenderOptions
    settings: ChatSettings
    console: Console
    history: list[Message] = field(default_factory=list)

    def ask(self, text: str) -> Reply | None:
        """Send a user message, show the reply and keep both in the history.

        Args:
            text: the user's message.

        Returns:
            The reply, or None when generation was interrupted (Ctrl-C); the history is then unchanged.

        Raises:
            OsstuneError: the conversation no longer fits the model's context, or cannot be rendered.
        """
        messages = [*self.history, Message("user", text)]
        printer = ReplyPrinter(self.console)
        splitter = StreamSplitter(self.tokenizer) if self.settings.stream else None
        start = time.perf_counter()
        try:
            reply = generate(self.model, self.tokenizer, messages, self.options,
                             max_new_tokens=self.settings.max_new_tokens, temperature=self.settings.temperature,
                             top_p=self.settings.top_p, max_context=self.settings.max_context,
                             on_token=_printing(splitter, printer) if splitter is not None else None)
        except KeyboardInterrupt:
            printer.close()
            self.console.print("(interrupted; this reply is not kept in the conversation)", style="yellow")
            return None
        seconds = time.perf_counter() - start
        for piece in splitter.flush() if splitter is not None else reply_pieces(reply):
            printer.show(piece)
        printer.close()
        self._footer(reply, seconds)
        self.history = [*messages, assistant_message(reply)]
        return reply

    def command(self, line: str) -> bool:
        """Run a slash command.

        Args:
            line: the command line, e.g. ``/reasoning high``.

        Returns:
            False when the chat should end (``/exit``), else True.
        """
        word, _, argument = line.strip().removeprefix("/").partition(" ")
        argument = argument.strip()
        if word in EXIT_COMMANDS:
            return False
        if word == "clear":
            self.history = []
            self.console.print("(conversation cleared)", style="dim")
        elif word == "reasoning" and argument in REASONING_EFFORTS:
            self.options = dataclasses.replace(self.options, reasoning_effort=argument)
            self.console.print(f"(reasoning effort: {argument})", style="dim")
        elif word == "reasoning":
            self.console.print(f"usage: /reasoning {'|'.join(REASONING_EFFORTS)} (now "
                               f"{self.options.reasoning_effort})", style="yellow", markup=False)
        else:
            self.console.print(f"unknown command /{word}; {HELP}", style="yellow", markup=False, soft_wrap=True)
        return True

    def _footer(self, reply: Reply, seconds: float) -> None:
        """Say how long the reply took, and whether it was cut off or held no harmony message."""
        count = len(reply.token_ids)
        if not (reply.reasoning or reply.final or reply.tool_calls) and count:
            raw = self.tokenizer.decode(reply.token_ids, skip_special_tokens=False)
            self.console.print(f"(no message could be parsed from the output; raw: {raw!r})", style="yellow",
                               markup=False, highlight=False, soft_wrap=True)
        if not reply.finished:
            self.console.print(f"(cut off after {count} new tokens: raise --max_new_tokens for longer replies)",
                               style="yellow", markup=False, soft_wrap=True)
        rate = count / seconds if seconds > 0 else 0.0
        self.console.print(f"[{count} tokens, {seconds:.1f} s, {rate:.1f} tokens/s]", style="dim", markup=False,
                           highlight=False)


def _printing(splitter: StreamSplitter, printer: ReplyPrinter) -> Callable[[int], None]:
    """A token callback that prints every piece the splitter releases."""

    def on_token(token: int) -> None:
        for piece in splitter.feed(token):
            printer.show(piece)

    return on_token


def read_line(console: Console, lines: Iterator[str] | None) -> str | None:
    """The next user line: from ``lines`` (echoed after the prompt) or the terminal; None at end of input.

    Args:
        console: where the prompt goes.
        lines: an iterator of lines, or None to read from the terminal (Ctrl-D and Ctrl-C end the input).
    """
    if lines is None:
        try:
            return console.input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            console.print()
            return None
    line = next(lines, None)
    if line is not None:
        console.print(PROMPT, end="")
        console.print(line.rstrip("\r\n"), markup=False, highlight=False, soft_wrap=True)
    return line


def chat_loop(session: ChatSession, lines: Iterable[str] | None = None) -> int:
    """Talk with the model until ``/exit`` or the end of the input.

    Args:
        session: the chat session.
        lines: user lines (a file, a pipe, a list); None reads from the terminal.

    Returns:
        The exit code, 0.
    """
    console = session.console
    console.print(HELP, style="dim", markup=False, soft_wrap=True)
    source = iter(lines) if lines is not None else None
    while (line := read_line(console, source)) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not session.command(text):
                break
            continue
        try:
            session.ask(text)
        except OsstuneError as exc:
            console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            console.print("(/clear starts a new conversation)", style="dim")
    return 0
