"""The in-memory conversation that every dataset format is parsed into and every renderer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant.

    Args:
        name: function name, without the ``functions.`` namespace.
        arguments: the arguments exactly as the model emits them (a JSON string).
    """

    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One conversation turn.

    Args:
        role: one of ``ROLES``.
        content: the visible text; for an assistant turn, the final answer (or the tool-call preamble).
        thinking: assistant reasoning (the harmony ``analysis`` channel); ``None`` when the turn has none,
            ``""`` when it explicitly has empty reasoning (e.g. ``<think>\\n\\n</think>``).
        tool_calls: function calls made by an assistant turn.
        name: for a ``tool`` turn, the function whose result this is (inferred from the last call if absent).
    """

    role: Role
    content: str
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """This message in the ``messages`` dataset format (so result files read back as datasets):
        ``role`` and ``content``, plus ``thinking``, OpenAI-style ``tool_calls`` and ``name`` when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking is not None:
            out["thinking"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    """A parsed dataset record.

    Args:
        messages: the turns in order.
        tools: function definitions offered to the model (OpenAI ``tools`` schema), if any.
        source: where the record came from (file or dataset name), for error messages and reports.
        index: 0-based position of the record within its source.
    """

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = field(default=())
    source: str = ""
    index: int = 0
