"""Teacher-forced scores on the trained tokens: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from osstune.chat.options import IGNORE_INDEX


@dataclass(frozen=True)
class Scores:
    """Token-level scores over every trained position of a split.

    Args:
        loss: mean cross-entropy (nats) over trained tokens.
        accuracy: share of trained tokens whose argmax prediction is the target.
        tokens: number of trained tokens scored.
    """

    loss: float
    accuracy: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)``."""
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def teacher_forced_scores(model: Any, input_ids: list[Any], labels: list[Any], batch_size: int = 16,
                          on_batch: Callable[[int], None] | None = None) -> Scores:
    """Score samples with teacher forcing: at each trained position, does the model predict the target token?

    Args:
        model: a causal LM (PEFT models included).
        input_ids: one id sequence per sample.
        labels: unshifted labels per sample, ``IGNORE_INDEX`` where not trained.
        batch_size: samples per forward pass (right-padded).
        on_batch: called with the number of samples after each forward pass (e.g. a progress bar's advance).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = [torch.as_tensor(x, dtype=torch.long) for x in input_ids[start:start + batch_size]]
            labs = [torch.as_tensor(x, dtype=torch.long) for x in labels[start:start + batch_size]]
            width = max(len(x) for x in ids)
            batch = torch.zeros(len(ids), width, dtype=torch.long)
            target = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for row, (x, y) in enumerate(zip(ids, labs)):
                batch[row, : len(x)], target[row, : len(y)], mask[row, : len(x)] = x, y, 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            target = target[:, 1:].to(device)
            trained = target != IGNORE_INDEX
            picked = logits[trained]
            loss_sum += torch.nn.functional.cross_entropy(picked, target[trained], reduction="sum").item()
            correct += int((picked.argmax(-1) == target[trained]).sum())
            count += int(trained.sum())
            if on_batch is not None:
                on_batch(len(ids))
    finally:
        model.train(was_training)
    return Scores(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1), tokens=count)
