"""Rendering options shared by training, `osstune data`, inference and evaluation."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Literal

LossScale = Literal["default", "last_round", "all", "ignore_empty_think"]
LOSS_SCALES: tuple[str, ...] = ("default", "last_round", "all", "ignore_empty_think")
REASONING_EFFORTS: tuple[str, ...] = ("low", "medium", "high")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
IGNORE_INDEX = -100


def today() -> str:
    """Today's date as the harmony system message writes it (YYYY-MM-DD)."""
    return _dt.date.today().isoformat()


@dataclass(frozen=True)
class RenderOptions:
    """How conversations become tokens.

    Args:
        current_date: the ``Current date:`` line of the harmony system message (YYYY-MM-DD). Fixed per run and
            recorded in ``args.json`` so that training and inference render identically.
        reasoning_effort: ``low``, ``medium`` or ``high`` (the ``Reasoning:`` line).
        model_identity: first line of the harmony system message.
        system: default developer instructions, used when a conversation has no system/developer message.
        loss_scale: which tokens are trained: ``default`` (every assistant turn), ``last_round`` (the last
            assistant turn only), ``all`` (every token), ``ignore_empty_think`` (like default, but an assistant
            turn with empty reasoning is trained as a final message with no analysis message).
    """

    current_date: str = field(default_factory=today)
    reasoning_effort: str = "medium"
    model_identity: str = DEFAULT_MODEL_IDENTITY
    system: str | None = None
    loss_scale: LossScale = "default"


@dataclass(frozen=True)
class Sample:
    """One training sequence.

    Args:
        input_ids: token ids of the whole sequence.
        labels: same length; the token id where the position is trained, ``IGNORE_INDEX`` (-100) elsewhere.
            Labels are *not* shifted: ``labels[i]`` is the target of the prediction made at ``i - 1``.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        """Number of supervised tokens."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)
