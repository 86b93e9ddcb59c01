"""Triton kernels of the gpt-oss clamped SwiGLU (see ``osstune.kernels.swiglu``): one forward and one backward pass.

Both kernels read contiguous ``[S, F]`` rows of interleaved gate/up columns (gate = even column, up = odd column),
compute in float32 whatever the storage dtype, and tile the grid as row blocks x output-column blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32
"""Rows of ``[S, F]`` per program."""

BLOCK_OUT_COLS = 64
"""Output columns (gate/up pairs) per program; each program reads ``2 * BLOCK_OUT_COLS`` input columns per row."""

NUM_WARPS = 4
"""Warps per program."""


@triton.jit
def _sigmoid(z):
    """``1 / (1 + exp(-z))`` (what ``tl.sigmoid`` computes; spelled out so that the CPU interpreter can run it)."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _load_pairs(x_ptr, rows, num_rows, width, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr):
    """Gate and up tiles ``[BLOCK_S, BLOCK_J]`` (float32) of ``rows`` and of this program's output columns."""
    cols = tl.program_id(1) * (2 * BLOCK_J) + tl.arange(0, 2 * BLOCK_J)
    offsets = rows.to(tl.int64)[:, None] * (2 * width) + cols[None, :]
    mask = (rows < num_rows)[:, None] & (cols < 2 * width)[None, :]
    both = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(both, (BLOCK_S, BLOCK_J, 2)))
    return gate, up


@triton.jit
def _clamp_swiglu_fwd_kernel(
    x_ptr, out_ptr, num_rows, width, alpha, limit, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr
):
    """``out[s, j] = (clamp(x[s, 2j+1], -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(x[s, 2j], limit)``."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    pairs = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    gate, up = _load_pairs(x_ptr, rows, num_rows, width, BLOCK_S, BLOCK_J)
    # Comparisons rather than min/max keep NaN as torch.clamp does.
    gate = tl.where(gate > limit, limit, gate)
    up = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
    out = (up + 1.0) * (gate * _sigmoid(alpha * gate))
    offsets = rows.to(tl.int64)[:, None] * width + pairs[None, :]
    mask = (rows < num_rows)[:, None] & (pairs < width)[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamp_swiglu_bwd_kernel(
    x_ptr, grad_out_ptr, grad_x_ptr, num_rows, width, alpha, limit, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr
):
    """Input gradient of the forward kernel, recomputing the activation; clamps pass gradient where inactive."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    pairs = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    gate_in, up_in = _load_pairs(x_ptr, rows, num_rows, width, BLOCK_S, BLOCK_J)
    out_offsets = rows.to(tl.int64)[:, None] * width + pairs[None, :]
    out_mask = (rows < num_rows)[:, None] & (pairs < width)[None, :]
    grad_out = tl.load(grad_out_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    gate = tl.where(gate_in > limit, limit, gate_in)
    up = tl.where(up_in > limit, limit, tl.where(up_in < -limit, -limit, up_in))
    sig = _sigmoid(alpha * gate)
    grad_glu = grad_out * (up + 1.0)
    grad_gate = grad_glu * (sig + gate * sig * (1.0 - sig) * alpha)
    grad_up = grad_out * (gate * sig)
    # torch.clamp's backward passes the gradient where min <= x <= max (bounds included, NaN excluded).
    grad_gate = tl.where(gate_in <= limit, grad_gate, 0.0)
    grad_up = tl.where((up_in >= -limit) & (up_in <= limit), grad_up, 0.0)
    both = tl.reshape(tl.join(grad_gate, grad_up), (BLOCK_S, 2 * BLOCK_J))
    cols = tl.program_id(1) * (2 * BLOCK_J) + tl.arange(0, 2 * BLOCK_J)
    offsets = rows.to(tl.int64)[:, None] * (2 * width) + cols[None, :]
    mask = (rows < num_rows)[:, None] & (cols < 2 * width)[None, :]
    tl.store(grad_x_ptr + offsets, both.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _grid(num_rows: int, width: int) -> tuple[int, int]:
    """Programs along rows (grid axis 0, which has no 65535 limit) and along output columns."""
    return triton.cdiv(num_rows, BLOCK_ROWS), triton.cdiv(width, BLOCK_OUT_COLS)


def clamp_swiglu_forward(gate_up_SF: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Run the forward kernel.

    Args:
        gate_up_SF: contiguous ``[S, F]`` with F even, float32/float16/bfloat16.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        The activation ``[S, F / 2]`` in the dtype of ``gate_up_SF``.
    """
    num_rows, width = gate_up_SF.shape[0], gate_up_SF.shape[1] // 2
    out_SI = gate_up_SF.new_empty(num_rows, width)
    if out_SI.numel():
        _clamp_swiglu_fwd_kernel[_grid(num_rows, width)](
            gate_up_SF, out_SI, num_rows, width, float(alpha), float(limit),
            BLOCK_S=BLOCK_ROWS, BLOCK_J=BLOCK_OUT_COLS, num_warps=NUM_WARPS,
        )
    return out_SI


def clamp_swiglu_backward(
    gate_up_SF: torch.Tensor, grad_SI: torch.Tensor, alpha: float, limit: float
) -> torch.Tensor:
    """Run the backward kernel.

    Args:
        gate_up_SF: the forward's contiguous input ``[S, F]``.
        grad_SI: contiguous gradient of the activation ``[S, F / 2]``, same dtype.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        The gradient of ``gate_up_SF``, ``[S, F]``, in its dtype.
    """
    num_rows, width = gate_up_SF.shape[0], gate_up_SF.shape[1] // 2
    grad_SF = torch.empty_like(gate_up_SF)
    if grad_SF.numel():
        _clamp_swiglu_bwd_kernel[_grid(num_rows, width)](
            gate_up_SF, grad_SI, grad_SF, num_rows, width, float(alpha), float(limit),
            BLOCK_S=BLOCK_ROWS, BLOCK_J=BLOCK_OUT_COLS, num_warps=NUM_WARPS,
        )
    return grad_SF
