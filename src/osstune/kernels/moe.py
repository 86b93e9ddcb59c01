"""The elementwise passes of the grouped expert forward, fused: the gate activation and the expert combine.

``gate_activation`` turns the gate/up projection of the sorted (token, expert) rows into the expert activation:
``clamp_swiglu(base + bias[expert] + lora)`` in one pass that overwrites ``base`` with the pre-activation and saves
only that for the backward pass, whose single pass is the clamped SwiGLU's own (the gradient of the pre-activation
is the gradient of both ``base`` and ``lora``).

``combine_experts`` turns the down projection of the sorted rows into each token's routing-weighted sum,
``out[t] = sum_k w[t, k] * (down[row(t, k)] + bias[e(t, k)])``, in one pass that gathers every token's K rows
(instead of weighting, scattering into a zero-filled ``[T * K, H]`` tensor and summing it); its backward is one
pass that writes the rows' gradient ``w * grad_out[t]`` and the routing weights' gradient
``dot(down[s] + bias[e], grad_out[t])``.

Both run Triton kernels on CUDA (``osstune.kernels.moe_triton``, imported on first use) and PyTorch
implementations of the same formulas elsewhere, and both compute in at least float32 whatever the storage dtype.
The expert biases are frozen under LoRA and get no gradient from the fused functions; a bias that requires grad
sends the call to the unfused PyTorch operations, through which autograd differentiates everything.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from osstune.kernels.swiglu import (
    TRITON_DTYPES,
    clamp_swiglu,
    torch_clamp_swiglu_backward,
    torch_clamp_swiglu_forward,
)


def gate_activation(
    base_SF: torch.Tensor,
    lora_SF: torch.Tensor | None,
    bias_EF: torch.Tensor | None,
    expert_S: torch.Tensor,
    *,
    alpha: float,
    limit: float,
    use_triton: bool | None = None,
    with_pre: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``clamp_swiglu(base + bias[expert] + lora)`` in one pass, differentiable in ``base_SF`` and ``lora_SF``.

    The caller gives ``base_SF`` up: it is overwritten in place with the pre-activation (summed in float32, rounded
    once to its dtype; the Triton path writes a contiguous copy instead when it is not contiguous), which is the
    only tensor kept for the backward pass and becomes an output of the autograd graph. It must therefore not be a
    leaf that requires grad. The activation is computed from the stored (rounded) pre-activation, so
    ``clamp_swiglu(pre)`` rebuilds it bit for bit, and the backward differentiates at that same point.

    Args:
        base_SF: the base projection ``[S, F]`` of rows sorted by expert, F even, gate and up columns interleaved
            (gate first); overwritten (see above).
        lora_SF: the LoRA product ``[S, F]`` to add (all adapters summed), or None.
        bias_EF: the expert biases ``[E, F]``, or None. One that requires grad (with grad mode on) runs the
            unfused PyTorch operations instead, which give it a gradient and leave ``base_SF`` untouched.
        expert_S: the expert of each row, ``[S]``, integer.
        alpha: sigmoid scale of the gate (``config.swiglu_alpha``).
        limit: clamp limit (``config.swiglu_limit``).
        use_triton: run the Triton kernels (True), PyTorch (False), or choose by device (None: Triton on CUDA for
            float32/float16/bfloat16). True on CPU tensors works only under Triton's interpreter.
        with_pre: also return the pre-activation the backward pass keeps (to rebuild the activation from it).

    Returns:
        The activation ``[S, F / 2]`` in the dtype of ``base_SF``; with ``with_pre``, ``(activation, pre)``.

    Raises:
        ValueError: shapes that do not fit together, an odd F, or the Triton kernels asked for a dtype they do not
            handle.
    """
    if base_SF.dim() != 2 or base_SF.shape[1] % 2:
        raise ValueError(f"the gate/up projection must be [S, F] with F even, got {tuple(base_SF.shape)}")
    rows, width = base_SF.shape
    if lora_SF is not None and lora_SF.shape != base_SF.shape:
        raise ValueError(f"the LoRA product has shape {tuple(lora_SF.shape)}, the projection {tuple(base_SF.shape)}")
    if bias_EF is not None and (bias_EF.dim() != 2 or bias_EF.shape[1] != width):
        raise ValueError(f"the gate/up bias must be [E, {width}], got {tuple(bias_EF.shape)}")
    if expert_S.shape != (rows,):
        raise ValueError(f"expert_S must be [{rows}], got {tuple(expert_S.shape)}")
    if bias_EF is not None and bias_EF.requires_grad and torch.is_grad_enabled():
        pre_SF = base_SF + bias_EF.index_select(0, expert_S)
        if lora_SF is not None:
            pre_SF = pre_SF + lora_SF
        pre_SF = pre_SF.to(base_SF.dtype)
        act_SI = clamp_swiglu(pre_SF, alpha=alpha, limit=limit, use_triton=use_triton)
        return (act_SI, pre_SF) if with_pre else act_SI
    use_triton = _resolve_triton(use_triton, base_SF.is_cuda, base_SF.dtype)
    if use_triton:
        base_SF = base_SF.contiguous()
        lora_SF = None if lora_SF is None else lora_SF.to(base_SF.dtype).contiguous()
        bias_EF = None if bias_EF is None else bias_EF.to(base_SF.dtype).contiguous()
        expert_S = expert_S.contiguous()
    act_SI, pre_SF = GateActivation.apply(base_SF, lora_SF, bias_EF, expert_S, float(alpha), float(limit), use_triton)
    return (act_SI, pre_SF) if with_pre else act_SI


class GateActivation(torch.autograd.Function):
    """Autograd function of ``gate_activation``; returns the activation and ``base_SF``, marked as modified."""

    @staticmethod
    def forward(
        ctx: Any,
        base_SF: torch.Tensor,
        lora_SF: torch.Tensor | None,
        bias_EF: torch.Tensor | None,
        expert_S: torch.Tensor,
        alpha: float,
        limit: float,
        use_triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the activation, storing the pre-activation over ``base_SF``.

        Args:
            ctx: autograd context.
            base_SF: base projection ``[S, F]``.
            lora_SF: LoRA product ``[S, F]``, or None.
            bias_EF: expert biases ``[E, F]``, or None.
            expert_S: expert of each row, ``[S]``.
            alpha: sigmoid scale of the gate.
            limit: clamp limit.
            use_triton: run the Triton kernel (else PyTorch).
        """
        if use_triton:
            act_SI = _moe_kernels().gate_activation_forward(base_SF, lora_SF, bias_EF, expert_S, alpha, limit)
        else:
            act_SI = torch_gate_activation_forward(base_SF, lora_SF, bias_EF, expert_S, alpha, limit)
        ctx.mark_dirty(base_SF)  # also bumps its version, so a stale saved reference to it fails loudly
        ctx.save_for_backward(base_SF)
        ctx.set_materialize_grads(False)
        ctx.alpha, ctx.limit, ctx.use_triton = alpha, limit, use_triton
        return act_SI, base_SF

    @staticmethod
    def backward(
        ctx: Any, grad_SI: torch.Tensor | None, grad_pre_SF: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        """Gradient of the pre-activation, returned for both ``base_SF`` and ``lora_SF``.

        Args:
            ctx: autograd context.
            grad_SI: gradient of the activation ``[S, F / 2]``, or None.
            grad_pre_SF: gradient of the returned pre-activation ``[S, F]`` (None unless a caller read it).
        """
        (pre_SF,) = ctx.saved_tensors
        grad_SF = grad_pre_SF
        if grad_SI is not None:
            if ctx.use_triton:
                grad_SI = grad_SI.to(pre_SF.dtype).contiguous()
                grad_act_SF = _swiglu_kernels().clamp_swiglu_backward(pre_SF, grad_SI, ctx.alpha, ctx.limit)
            else:
                grad_act_SF = torch_clamp_swiglu_backward(pre_SF, grad_SI, ctx.alpha, ctx.limit)
            grad_SF = grad_act_SF if grad_SF is None else grad_act_SF.add_(grad_SF)
        need_base, need_lora = ctx.needs_input_grad[:2]
        return grad_SF if need_base else None, grad_SF if need_lora else None, None, None, None, None, None


def torch_gate_activation_forward(
    base_SF: torch.Tensor,
    lora_SF: torch.Tensor | None,
    bias_EF: torch.Tensor | None,
    expert_S: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """``gate_activation``'s forward in PyTorch, in at least float32, without autograd bookkeeping.

    Args:
        base_SF: base projection ``[S, F]``; overwritten with the pre-activation.
        lora_SF: LoRA product ``[S, F]``, or None.
        bias_EF: expert biases ``[E, F]``, or None.
        expert_S: expert of each row, ``[S]``.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        The activation ``[S, F / 2]`` in the dtype of ``base_SF``.
    """
    pre_SF = base_SF.to(torch.promote_types(base_SF.dtype, torch.float32), copy=True)
    if bias_EF is not None:
        pre_SF.add_(bias_EF.index_select(0, expert_S))
    if lora_SF is not None:
        pre_SF.add_(lora_SF)
    base_SF.copy_(pre_SF)
    return torch_clamp_swiglu_forward(base_SF, alpha, limit)


def combine_experts(
    down_SH: torch.Tensor,
    bias_EH: torch.Tensor | None,
    expert_S: torch.Tensor,
    pair_S: torch.Tensor,
    weights_TK: torch.Tensor,
    num_tokens: int,
    top_k: int,
    use_triton: bool | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Each token's routing-weighted sum of its expert rows, ``sum_k w[t, k] * (down[row(t, k)] + bias[e(t, k)])``.

    Differentiable in ``down_SH`` and ``weights_TK`` (the router's softmax outputs); ``down_SH`` is kept for the
    backward pass only when the weights need a gradient.

    Args:
        down_SH: the down projection of the rows sorted by expert, ``[S, H]``, without its bias.
        bias_EH: the expert biases ``[E, H]``, or None. One that requires grad (with grad mode on) runs the unfused
            PyTorch operations instead, which give it a gradient.
        expert_S: the expert of each sorted row, ``[S]``, integer.
        pair_S: each sorted row's (token, slot) pair ``t * K + k``, ``[S]``: a permutation of ``range(T * K)``.
        weights_TK: the routing weights ``[T, K]``.
        num_tokens: tokens T.
        top_k: experts per token K.
        use_triton: run the Triton kernels (True), PyTorch (False), or choose by device (None: Triton on CUDA for
            float32/float16/bfloat16 rows). True on CPU tensors works only under Triton's interpreter.
        out_dtype: dtype of the result (default: that of ``down_SH``); the sum is accumulated in at least float32
            and rounded to it once.

    Returns:
        The sums ``[T, H]``.

    Raises:
        ValueError: shapes that do not fit together, or the Triton kernels asked for a dtype they do not handle.
    """
    if down_SH.dim() != 2 or down_SH.shape[0] != num_tokens * top_k:
        raise ValueError(f"down_SH must be [{num_tokens} * {top_k}, H], got {tuple(down_SH.shape)}")
    rows, hidden = down_SH.shape
    if pair_S.shape != (rows,) or expert_S.shape != (rows,):
        raise ValueError(f"pair_S and expert_S must be [{rows}], got {tuple(pair_S.shape)}, {tuple(expert_S.shape)}")
    if weights_TK.shape != (num_tokens, top_k):
        raise ValueError(f"weights_TK must be [{num_tokens}, {top_k}], got {tuple(weights_TK.shape)}")
    if bias_EH is not None and (bias_EH.dim() != 2 or bias_EH.shape[1] != hidden):
        raise ValueError(f"the down bias must be [E, {hidden}], got {tuple(bias_EH.shape)}")
    out_dtype = down_SH.dtype if out_dtype is None else out_dtype
    positions_S = torch.arange(rows, device=pair_S.device, dtype=pair_S.dtype)
    row_P = torch.empty_like(pair_S).index_copy_(0, pair_S, positions_S)
    if bias_EH is not None and bias_EH.requires_grad and torch.is_grad_enabled():
        return torch_combine_forward(down_SH, bias_EH, expert_S, row_P, weights_TK, out_dtype)
    use_triton = _resolve_triton(use_triton, down_SH.is_cuda, down_SH.dtype)
    if not use_triton:
        return CombineExperts.apply(down_SH, weights_TK, bias_EH, expert_S, pair_S, row_P, out_dtype, False)
    weights_TK = weights_TK if weights_TK.dtype in TRITON_DTYPES else weights_TK.float()
    bias_EH = None if bias_EH is None else bias_EH.to(down_SH.dtype).contiguous()
    kernel_dtype = out_dtype if out_dtype in TRITON_DTYPES else torch.float32
    out_TH = CombineExperts.apply(
        down_SH.contiguous(), weights_TK.contiguous(), bias_EH, expert_S.contiguous(), pair_S.contiguous(), row_P,
        kernel_dtype, True,
    )
    return out_TH.to(out_dtype)


class CombineExperts(torch.autograd.Function):
    """Autograd function of ``combine_experts``; differentiable in the rows and the routing weights."""

    @staticmethod
    def forward(
        ctx: Any,
        down_SH: torch.Tensor,
        weights_TK: torch.Tensor,
        bias_EH: torch.Tensor | None,
        expert_S: torch.Tensor,
        pair_S: torch.Tensor,
        row_P: torch.Tensor,
        out_dtype: torch.dtype,
        use_triton: bool,
    ) -> torch.Tensor:
        """Compute the sums.

        Args:
            ctx: autograd context.
            down_SH: rows sorted by expert, ``[S, H]``.
            weights_TK: routing weights ``[T, K]``.
            bias_EH: expert biases ``[E, H]``, or None.
            expert_S: expert of each sorted row, ``[S]``.
            pair_S: pair ``t * K + k`` of each sorted row, ``[S]``.
            row_P: sorted row of each pair (the inverse permutation of ``pair_S``), ``[T * K]``.
            out_dtype: dtype of the sums.
            use_triton: run the Triton kernels (else PyTorch).
        """
        num_tokens, top_k = weights_TK.shape
        if use_triton:
            out_TH = _moe_kernels().combine_forward(
                down_SH, bias_EH, expert_S, row_P, weights_TK.reshape(-1), num_tokens, top_k, out_dtype
            )
        else:
            out_TH = torch_combine_forward(down_SH, bias_EH, expert_S, row_P, weights_TK, out_dtype)
        ctx.save_for_backward(down_SH if ctx.needs_input_grad[1] else None, weights_TK, bias_EH, expert_S, pair_S)
        ctx.down_dtype, ctx.use_triton = down_SH.dtype, use_triton
        return out_TH

    @staticmethod
    def backward(
        ctx: Any, grad_TH: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None, None]:
        """Gradients of the rows and of the routing weights.

        Args:
            ctx: autograd context.
            grad_TH: gradient of the sums ``[T, H]``.
        """
        down_SH, weights_TK, bias_EH, expert_S, pair_S = ctx.saved_tensors
        down_dtype = ctx.down_dtype if ctx.needs_input_grad[0] else None
        if ctx.use_triton:
            grad_TH = grad_TH if grad_TH.dtype in TRITON_DTYPES else grad_TH.float()
            grad_SH, grad_P = _moe_kernels().combine_backward(
                grad_TH.contiguous(), down_SH, bias_EH, expert_S, pair_S, weights_TK.reshape(-1),
                weights_TK.shape[1], down_dtype,
            )
        else:
            grad_SH, grad_P = torch_combine_backward(
                grad_TH, down_SH, bias_EH, expert_S, pair_S, weights_TK, down_dtype
            )
        grad_TK = None if grad_P is None else grad_P.view(weights_TK.shape).to(weights_TK.dtype)
        return grad_SH, grad_TK, None, None, None, None, None, None


def torch_combine_forward(
    down_SH: torch.Tensor,
    bias_EH: torch.Tensor | None,
    expert_S: torch.Tensor,
    row_P: torch.Tensor,
    weights_TK: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``combine_experts``'s forward in PyTorch operations (differentiable in everything under autograd).

    Args:
        down_SH: rows sorted by expert, ``[S, H]``.
        bias_EH: expert biases ``[E, H]``, or None.
        expert_S: expert of each sorted row, ``[S]``.
        row_P: sorted row of each pair ``t * K + k``, ``[T * K]``.
        weights_TK: routing weights ``[T, K]``.
        out_dtype: dtype of the sums.

    Returns:
        ``[T, H]``, summed over K in at least float32.
    """
    num_tokens, top_k = weights_TK.shape
    compute = torch.promote_types(down_SH.dtype, torch.float32)
    x_PH = down_SH.index_select(0, row_P).to(compute)
    if bias_EH is not None:
        x_PH = x_PH + bias_EH.index_select(0, expert_S.index_select(0, row_P)).to(compute)
    weighted_PH = x_PH * weights_TK.reshape(-1, 1).to(compute)
    return weighted_PH.view(num_tokens, top_k, down_SH.shape[1]).sum(dim=1).to(out_dtype)


def torch_combine_backward(
    grad_TH: torch.Tensor,
    down_SH: torch.Tensor | None,
    bias_EH: torch.Tensor | None,
    expert_S: torch.Tensor,
    pair_S: torch.Tensor,
    weights_TK: torch.Tensor,
    down_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``combine_experts``'s backward in PyTorch, in at least float32.

    Args:
        grad_TH: gradient of the sums ``[T, H]``.
        down_SH: the forward's rows ``[S, H]`` when the weights need a gradient, else None.
        bias_EH: expert biases ``[E, H]``, or None.
        expert_S: expert of each sorted row, ``[S]``.
        pair_S: pair ``t * K + k`` of each sorted row, ``[S]``.
        weights_TK: routing weights ``[T, K]``.
        down_dtype: dtype of the rows' gradient when the rows need one, else None.

    Returns:
        The rows' gradient ``[S, H]`` (None where ``down_dtype`` is None) and the weights' gradient in pair order,
        ``[T * K]``, in the compute dtype (None where ``down_SH`` is None).
    """
    compute = torch.promote_types(torch.promote_types(grad_TH.dtype, weights_TK.dtype), torch.float32)
    grad_SH = grad_TH.index_select(0, pair_S // weights_TK.shape[1]).to(compute)
    grad_rows_SH = None
    if down_dtype is not None:
        weights_S = weights_TK.reshape(-1).index_select(0, pair_S).to(compute)
        grad_rows_SH = (grad_SH * weights_S[:, None]).to(down_dtype)
    grad_P = None
    if down_SH is not None:
        x_SH = down_SH.to(compute)
        if bias_EH is not None:
            x_SH = x_SH + bias_EH.index_select(0, expert_S).to(compute)
        dots_S = (x_SH * grad_SH).sum(dim=-1)
        grad_P = torch.empty_like(dots_S).index_copy_(0, pair_S, dots_S)
    return grad_rows_SH, grad_P


def _resolve_triton(use_triton: bool | None, is_cuda: bool, dtype: torch.dtype) -> bool:
    """Whether to run the Triton kernels: as asked, or by default on CUDA for the dtypes they handle.

    Args:
        use_triton: the caller's choice, None for the default.
        is_cuda: whether the tensors are on CUDA.
        dtype: storage dtype of the main tensor.

    Raises:
        ValueError: the kernels were asked for a dtype they do not handle.
    """
    if use_triton is None:
        return is_cuda and dtype in TRITON_DTYPES
    if use_triton and dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton expert kernels take {TRITON_DTYPES}, got {dtype}")
    return use_triton


def _moe_kernels() -> Any:
    """The Triton kernel module, imported on first use so that this module needs no Triton on CPU-only installs."""
    return importlib.import_module("osstune.kernels.moe_triton")


def _swiglu_kernels() -> Any:
    """The clamped SwiGLU's Triton kernels, whose backward is ``gate_activation``'s backward."""
    return importlib.import_module("osstune.kernels.swiglu_triton")
