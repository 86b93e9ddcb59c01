"""Triton kernel of ``osstune.kernels.cross_entropy``: per-row cross-entropy of a logits chunk, its gradient written
over the logits.

One program per row makes two passes over the vocabulary in blocks: an online log-sum-exp (running maximum and
rescaled sum, float32) with the target's logit, then ``(softmax - onehot(target)) * grad_scale`` stored in place in
the logits' dtype. Rows whose target is ``ignore_index`` get loss 0 and a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096
"""Vocabulary columns per loop step."""

NUM_WARPS = 8
"""Warps per program (one row)."""


@triton.jit
def _add(a, b):
    """Sum (``tl.sum`` spelled as ``tl.reduce`` so that the CPU interpreter can run it)."""
    return a + b


@triton.jit
def _max(a, b):
    """Maximum (``tl.max`` spelled as ``tl.reduce``, as ``_add``)."""
    return tl.maximum(a, b)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, row_stride, targets_ptr, losses_ptr, scale_ptr, vocab, ignore_index, BLOCK: tl.constexpr,
):
    """Loss of row ``program_id(0)`` into ``losses``; its gradient over its logits."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.reduce(x, 0, _max))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.reduce(tl.exp(x - new_max), 0, _add)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(logits_row + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(logits_row + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       grad_scale: torch.Tensor) -> torch.Tensor:
    """Per-row losses (float32) of ``logits`` ``[C, V]`` (last dimension contiguous); the gradient of
    ``grad_scale * sum(losses)`` overwrites the logits.

    Args:
        logits: the chunk's logits, overwritten.
        targets: ``[C]`` integer targets.
        ignore_index: target value of rows that carry no loss.
        grad_scale: the gradient's factor (``1 / divisor`` of a mean), a one-element float32 device tensor.
    """
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_rows_kernel[(rows,)](
            logits, logits.stride(0), targets.contiguous(), losses, grad_scale, vocab, ignore_index,
            BLOCK=BLOCK_V, num_warps=NUM_WARPS,
        )
    return losses
