"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` against targets, without the full logits.

The tokens are processed in chunks of ``chunk_rows``: for each, the chunk's logits are computed (one GEMM), the
loss and its gradient with respect to the logits are computed in one kernel that overwrites the logits with the
gradient (``cross_entropy_triton`` on CUDA, PyTorch elsewhere), and that gradient is multiplied back into the
hidden states' gradient (and the weight's, when it is trained) right away; the backward pass only scales them.
Only one chunk of logits exists at a time. Chunks are sized by bytes (``CHUNK_BYTES``), not by a ratio of the
vocabulary to the hidden size, so the GEMMs keep large row counts (liger-kernel's rule gives 128-row chunks for
gpt-oss's 201,088-token vocabulary, whose GEMMs run well below the card's rate).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from osstune.chat.options import IGNORE_INDEX
from osstune.kernels.swiglu import TRITON_DTYPES

CHUNK_BYTES = 2**29
"""Logits bytes of one chunk (512 MiB: 1,280 rows of gpt-oss's vocabulary in bf16)."""


def chunk_rows(vocab: int, itemsize: int) -> int:
    """Rows per chunk: ``CHUNK_BYTES`` of logits, a multiple of 128, at least 128.

    Args:
        vocab: vocabulary size V.
        itemsize: bytes per logit.
    """
    return max(128, CHUNK_BYTES // (vocab * itemsize) // 128 * 128)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    divisor: float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    rows_per_chunk: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``sum over rows of cross_entropy(hidden @ weight.T, targets) / divisor``, differentiable in ``hidden`` and
    ``weight``.

    Args:
        hidden: ``[N, H]`` final hidden states (any leading shape is flattened).
        weight: ``[V, H]`` output embedding, in the dtype of ``hidden``.
        targets: ``[N]`` integer targets; ``ignore_index`` marks rows without loss.
        divisor: what the summed loss is divided by (Hugging Face's ``num_items_in_batch``); None: the number of
            rows with a target (a mean).
        ignore_index: see ``targets``.
        rows_per_chunk: rows per chunk (default ``chunk_rows``).
        use_triton: the Triton kernel (True), PyTorch (False), or by device (None: Triton on CUDA).

    Returns:
        The float32 scalar loss.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} hidden rows")
    if divisor is None:
        divisor = (targets != ignore_index).sum().clamp(min=1)
    # A device tensor, never read on the host: the loss needs no synchronisation.
    divisor = torch.as_tensor(divisor, dtype=torch.promote_types(hidden.dtype, torch.float32),
                              device=hidden.device).reshape(1)
    if use_triton is None:
        use_triton = hidden.is_cuda and hidden.dtype in TRITON_DTYPES
    rows = rows_per_chunk or chunk_rows(weight.shape[0], hidden.element_size())
    return LinearCrossEntropy.apply(hidden, weight, targets, divisor, ignore_index, rows, use_triton)


class LinearCrossEntropy(torch.autograd.Function):
    """Autograd function of ``linear_cross_entropy``; the forward computes the gradients, the backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                ignore_index: int, rows: int, use_triton: bool) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = (torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight
                       else weight.new_empty(0))
        total = torch.zeros(1, dtype=torch.float32, device=hidden.device)
        grad_scale = 1.0 / divisor
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start:start + rows]
            logits = chunk @ weight.T
            total += cross_entropy_rows(logits, targets[start:start + rows], ignore_index, grad_scale,
                                        use_triton).sum()
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:start + rows])
            if need_weight:
                grad_weight += (logits.T @ chunk).to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return (total / divisor.float())[0]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if need_hidden else None
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor,
                       use_triton: bool) -> torch.Tensor:
    """Per-row float32 losses of a logits chunk ``[C, V]``; the gradient of ``grad_scale * sum(losses)`` with
    respect to the logits overwrites them (zero on rows whose target is ``ignore_index``).

    Args:
        logits: the chunk's logits, overwritten.
        targets: ``[C]`` integer targets.
        ignore_index: target of rows without loss.
        grad_scale: factor of the gradient, a one-element tensor (float32 or float64) on the logits' device.
        use_triton: the Triton kernel, else PyTorch (in at least float32).
    """
    if use_triton:
        return _triton_kernels().cross_entropy_rows(logits, targets, ignore_index, grad_scale)
    values = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(values, dim=-1)
    losses = torch.where(valid, lse - values.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.softmax(values, dim=-1)
    grad[torch.arange(len(safe), device=logits.device), safe] -= 1.0
    grad *= torch.where(valid[:, None], grad_scale.to(grad.dtype), 0.0)
    logits.copy_(grad)
    return losses.float()


def _triton_kernels() -> Any:
    """The Triton kernel module, imported on first use so that this module needs no Triton on CPU-only installs."""
    return importlib.import_module("osstune.kernels.cross_entropy_triton")
