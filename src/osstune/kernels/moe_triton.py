"""Triton kernels of the grouped expert forward (see ``osstune.kernels.moe``).

- ``gate_activation_forward``: one pass over the gate/up projection ``[S, F]`` that adds the LoRA product and the
  gathered expert bias, stores the pre-activation over the base projection (in place) and writes the clamped
  SwiGLU of it. Its backward is the clamped SwiGLU's own (``osstune.kernels.swiglu_triton``).
- ``combine_forward``: each token's routing-weighted sum of its expert rows (bias included), one pass over
  ``[T, H]`` tiles that gathers the K rows of every token.
- ``combine_backward``: one pass over the sorted rows that writes the rows' gradient and the routing weights'
  gradient (a dot product per row, accumulated over the hidden columns).

All kernels compute in float32 whatever the storage dtype and address contiguous row-major tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATE_BLOCK_ROWS = 32
"""Rows of ``[S, F]`` per program of the gate kernel."""

GATE_BLOCK_OUT_COLS = 64
"""Output columns (gate/up pairs) per program of the gate kernel; it reads ``2 * GATE_BLOCK_OUT_COLS`` columns."""

COMBINE_BLOCK_TOKENS = 32
"""Tokens per program of the combine forward kernel."""

COMBINE_BLOCK_HIDDEN = 128
"""Hidden columns per program of the combine forward kernel, and per loop step of its backward kernel."""

COMBINE_BACKWARD_BLOCK_ROWS = 16
"""Sorted rows per program of the combine backward kernel (each program walks all hidden columns)."""

NUM_WARPS = 4
"""Warps per program."""


@triton.jit
def _sigmoid(z):
    """``1 / (1 + exp(-z))``, spelled out so that the CPU interpreter can run it."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _add(a, b):
    """The combine function of a sum (``tl.sum`` spelled as ``tl.reduce`` so that the CPU interpreter can run it)."""
    return a + b


@triton.jit
def _gate_activation_fwd_kernel(
    base_ptr, lora_ptr, bias_ptr, expert_ptr, act_ptr, num_rows, width, alpha, limit,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``pre = base + bias[expert[s]] + lora`` (float32 sum), stored over ``base``; ``act = clamp_swiglu(pre)`` of
    the stored ``pre``, as ``clamp_swiglu_forward`` computes it from there."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * (2 * BLOCK_J) + tl.arange(0, 2 * BLOCK_J)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < 2 * width)[None, :]
    offsets = rows.to(tl.int64)[:, None] * (2 * width) + cols[None, :]
    pre = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        expert = tl.load(expert_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        pre += tl.load(bias_ptr + expert[:, None] * (2 * width) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        pre += tl.load(lora_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pre = pre.to(base_ptr.dtype.element_ty)
    tl.store(base_ptr + offsets, pre, mask=mask)
    gate, up = tl.split(tl.reshape(pre.to(tl.float32), (BLOCK_S, BLOCK_J, 2)))
    # Comparisons rather than min/max keep NaN as torch.clamp does.
    gate = tl.where(gate > limit, limit, gate)
    up = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
    act = (up + 1.0) * (gate * _sigmoid(alpha * gate))
    pairs = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    act_offsets = rows.to(tl.int64)[:, None] * width + pairs[None, :]
    act_mask = row_mask[:, None] & (pairs < width)[None, :]
    tl.store(act_ptr + act_offsets, act.to(act_ptr.dtype.element_ty), mask=act_mask)


@triton.jit
def _combine_fwd_kernel(
    down_ptr, bias_ptr, expert_ptr, row_ptr, weight_ptr, out_ptr, num_tokens, hidden,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``out[t] = sum_k w[t, k] * (down[row[t, k]] + bias[expert[row[t, k]]])`` for a tile of tokens x columns."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    acc = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    for k in tl.static_range(TOP_K):
        pair = tokens.to(tl.int64) * TOP_K + k
        row = tl.load(row_ptr + pair, mask=token_mask, other=0).to(tl.int64)
        weight = tl.load(weight_ptr + pair, mask=token_mask, other=0.0).to(tl.float32)
        x = tl.load(down_ptr + row[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            expert = tl.load(expert_ptr + row, mask=token_mask, other=0).to(tl.int64)
            x += tl.load(bias_ptr + expert[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += weight[:, None] * x
    offsets = tokens.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(
    grad_out_ptr, down_ptr, bias_ptr, expert_ptr, pair_ptr, weight_ptr, grad_down_ptr, grad_weight_ptr,
    num_rows, hidden,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DOWN: tl.constexpr, NEED_WEIGHTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For sorted rows s of pair p = pair[s] and token t = p // K: ``grad_down[s] = w[p] * grad_out[t]`` and
    ``grad_weight[p] = dot(down[s] + bias[expert[s]], grad_out[t])`` (float32)."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < num_rows
    pair = tl.load(pair_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    token = pair // TOP_K
    weight = tl.load(weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        expert = tl.load(expert_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    dot = tl.full((BLOCK_S,), 0.0, tl.float32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (cols < hidden)[None, :]
        grad = tl.load(grad_out_ptr + token[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_offsets = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        if NEED_DOWN:
            grad_down = (weight[:, None] * grad).to(grad_down_ptr.dtype.element_ty)
            tl.store(grad_down_ptr + row_offsets, grad_down, mask=mask)
        if NEED_WEIGHTS:
            x = tl.load(down_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + expert[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.reduce(x * grad, 1, _add)
    if NEED_WEIGHTS:
        tl.store(grad_weight_ptr + pair, dot, mask=row_mask)


def gate_activation_forward(
    base_SF: torch.Tensor,
    lora_SF: torch.Tensor | None,
    bias_EF: torch.Tensor | None,
    expert_S: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Run the gate kernel; ``base_SF`` is overwritten with the pre-activation.

    Args:
        base_SF: contiguous base projection ``[S, F]``, F even, float32/float16/bfloat16; receives the
            pre-activation ``base + bias[expert_S] + lora`` rounded to its dtype.
        lora_SF: contiguous LoRA product ``[S, F]`` in the dtype of ``base_SF``, or None.
        bias_EF: contiguous expert biases ``[E, F]`` in the dtype of ``base_SF``, or None.
        expert_S: contiguous integer expert of each row, ``[S]``.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        The activation ``[S, F / 2]`` in the dtype of ``base_SF``, computed from the float32 pre-activation.
    """
    num_rows, width = base_SF.shape[0], base_SF.shape[1] // 2
    act_SI = base_SF.new_empty(num_rows, width)
    if act_SI.numel():
        grid = (triton.cdiv(num_rows, GATE_BLOCK_ROWS), triton.cdiv(width, GATE_BLOCK_OUT_COLS))
        _gate_activation_fwd_kernel[grid](
            base_SF, base_SF if lora_SF is None else lora_SF, base_SF if bias_EF is None else bias_EF, expert_S,
            act_SI, num_rows, width, float(alpha), float(limit),
            HAS_LORA=lora_SF is not None, HAS_BIAS=bias_EF is not None,
            BLOCK_S=GATE_BLOCK_ROWS, BLOCK_J=GATE_BLOCK_OUT_COLS, num_warps=NUM_WARPS,
        )
    return act_SI


def combine_forward(
    down_SH: torch.Tensor,
    bias_EH: torch.Tensor | None,
    expert_S: torch.Tensor,
    row_P: torch.Tensor,
    weights_P: torch.Tensor,
    num_tokens: int,
    top_k: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Run the combine forward kernel.

    Args:
        down_SH: contiguous expert outputs ``[S, H]``, sorted by expert, float32/float16/bfloat16.
        bias_EH: contiguous expert biases ``[E, H]`` in the dtype of ``down_SH``, or None.
        expert_S: contiguous integer expert of each sorted row, ``[S]``.
        row_P: contiguous integer sorted row of each (token, slot) pair ``p = t * K + k``, ``[T * K]``.
        weights_P: contiguous routing weights in pair order, ``[T * K]``, float32/float16/bfloat16.
        num_tokens: tokens T.
        top_k: experts per token K.
        out_dtype: dtype of the result, float32/float16/bfloat16.

    Returns:
        ``[T, H]`` sums, accumulated in float32.
    """
    hidden = down_SH.shape[1]
    out_TH = down_SH.new_empty(num_tokens, hidden, dtype=out_dtype)
    if out_TH.numel():
        grid = (triton.cdiv(num_tokens, COMBINE_BLOCK_TOKENS), triton.cdiv(hidden, COMBINE_BLOCK_HIDDEN))
        _combine_fwd_kernel[grid](
            down_SH, down_SH if bias_EH is None else bias_EH, expert_S, row_P, weights_P, out_TH, num_tokens, hidden,
            TOP_K=top_k, HAS_BIAS=bias_EH is not None,
            BLOCK_T=COMBINE_BLOCK_TOKENS, BLOCK_H=COMBINE_BLOCK_HIDDEN, num_warps=NUM_WARPS,
        )
    return out_TH


def combine_backward(
    grad_TH: torch.Tensor,
    down_SH: torch.Tensor | None,
    bias_EH: torch.Tensor | None,
    expert_S: torch.Tensor,
    pair_S: torch.Tensor,
    weights_P: torch.Tensor,
    top_k: int,
    down_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the combine backward kernel.

    Args:
        grad_TH: contiguous gradient of the sums ``[T, H]``, float32/float16/bfloat16.
        down_SH: the forward's contiguous expert outputs ``[S, H]`` when the weights need a gradient, else None.
        bias_EH: contiguous expert biases ``[E, H]`` in the dtype of ``down_SH``, or None.
        expert_S: contiguous integer expert of each sorted row, ``[S]``.
        pair_S: contiguous integer pair ``t * K + k`` of each sorted row, ``[S]``.
        weights_P: contiguous routing weights in pair order, ``[T * K]``.
        top_k: experts per token K.
        down_dtype: dtype of the rows' gradient when the rows need one, else None.

    Returns:
        The rows' gradient ``[S, H]`` in ``down_dtype`` (None where ``down_dtype`` is None), and the weights'
        gradient in pair order ``[T * K]`` in float32 (None where ``down_SH`` is None).
    """
    num_rows, hidden = pair_S.shape[0], grad_TH.shape[1]
    grad_SH = None if down_dtype is None else grad_TH.new_empty(num_rows, hidden, dtype=down_dtype)
    grad_P = None if down_SH is None else grad_TH.new_zeros(num_rows, dtype=torch.float32)
    if num_rows and hidden and (grad_SH is not None or grad_P is not None):
        _combine_bwd_kernel[(triton.cdiv(num_rows, COMBINE_BACKWARD_BLOCK_ROWS),)](
            grad_TH, grad_TH if down_SH is None else down_SH, grad_TH if bias_EH is None else bias_EH, expert_S,
            pair_S, weights_P, grad_TH if grad_SH is None else grad_SH, grad_TH if grad_P is None else grad_P,
            num_rows, hidden,
            TOP_K=top_k, HAS_BIAS=bias_EH is not None, NEED_DOWN=grad_SH is not None, NEED_WEIGHTS=grad_P is not None,
            BLOCK_S=COMBINE_BACKWARD_BLOCK_ROWS, BLOCK_H=COMBINE_BLOCK_HIDDEN, num_warps=NUM_WARPS,
        )
    return grad_SH, grad_P
