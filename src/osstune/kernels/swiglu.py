"""The clamped SwiGLU of gpt-oss experts, fused and memory-lean.

``clamp_swiglu`` computes transformers' ``GptOssExperts._apply_gate``: for ``gate_up`` ``[S, F]`` with gate = even
columns and up = odd columns,

    gate = min(gate, limit);  up = clamp(up, -limit, limit);  out = (up + 1) * gate * sigmoid(alpha * gate)

as one autograd function that saves only its input and recomputes the activation in the backward pass (autograd on
the reference keeps about five ``[S, F / 2]`` intermediates). On CUDA it runs one Triton kernel per pass; elsewhere a
PyTorch implementation of the same formula. Both compute in at least float32 whatever the storage dtype; the
gradient follows ``torch.clamp``'s rule: it passes where the clamp is inactive, the bounds themselves included.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
"""Storage dtypes the Triton kernels read and write."""


def clamp_swiglu(
    gate_up_SF: torch.Tensor, *, alpha: float, limit: float, use_triton: bool | None = None
) -> torch.Tensor:
    """The gpt-oss expert activation ``[..., F] -> [..., F / 2]`` (``GptOssExperts._apply_gate``), differentiable.

    Args:
        gate_up_SF: the gate/up projection ``[..., F]``, F even, gate and up columns interleaved (gate first).
        alpha: sigmoid scale of the gate (``config.swiglu_alpha``, 1.702 for gpt-oss).
        limit: clamp limit (``config.swiglu_limit``, 7.0 for gpt-oss).
        use_triton: run the Triton kernels (True), the PyTorch implementation (False), or choose by device (None:
            Triton on CUDA for float32/float16/bfloat16). True on a CPU tensor works only under Triton's
            interpreter (``TRITON_INTERPRET=1`` when the kernels were imported).

    Returns:
        ``(up + 1) * gate * sigmoid(alpha * gate)`` with the clamps applied, ``[..., F / 2]``, in the dtype of
        ``gate_up_SF``.

    Raises:
        ValueError: F is odd, or the Triton kernels were asked for a dtype they do not handle.
    """
    width = gate_up_SF.shape[-1]
    if width % 2:
        raise ValueError(f"the gate/up width must be even (interleaved gate and up columns), got {width}")
    if use_triton is None:
        use_triton = gate_up_SF.is_cuda and gate_up_SF.dtype in TRITON_DTYPES
    elif use_triton and gate_up_SF.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton SwiGLU kernels take {TRITON_DTYPES}, got {gate_up_SF.dtype}")
    lead = gate_up_SF.shape[:-1]
    out_SI = ClampSwiGLU.apply(gate_up_SF.reshape(-1, width), float(alpha), float(limit), use_triton)
    return out_SI.reshape(*lead, width // 2)


def clamp_swiglu_values(gate_up_SF: torch.Tensor, *, alpha: float, limit: float,
                        use_triton: bool | None = None) -> torch.Tensor:
    """``clamp_swiglu`` of ``[S, F]`` outside autograd (no graph, nothing saved), on the same kernels.

    Args:
        gate_up_SF: the gate/up projection ``[S, F]``, gate and up columns interleaved.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.
        use_triton: the Triton kernel (True), PyTorch (False), or by device (None: Triton on CUDA for
            float32/float16/bfloat16).
    """
    if use_triton is None:
        use_triton = gate_up_SF.is_cuda and gate_up_SF.dtype in TRITON_DTYPES
    with torch.no_grad():
        if use_triton:
            return _triton_kernels().clamp_swiglu_forward(gate_up_SF.contiguous(), float(alpha), float(limit))
        return torch_clamp_swiglu_forward(gate_up_SF, float(alpha), float(limit))


class ClampSwiGLU(torch.autograd.Function):
    """Autograd function of ``clamp_swiglu`` on ``[S, F]``; saves only the input and recomputes in the backward."""

    @staticmethod
    def forward(ctx: Any, gate_up_SF: torch.Tensor, alpha: float, limit: float, use_triton: bool) -> torch.Tensor:
        """Compute the activation.

        Args:
            ctx: autograd context.
            gate_up_SF: ``[S, F]``, gate and up columns interleaved.
            alpha: sigmoid scale of the gate.
            limit: clamp limit.
            use_triton: run the Triton kernel (else PyTorch).
        """
        if use_triton:
            gate_up_SF = gate_up_SF.contiguous()  # kept for the backward as the kernel reads it
        out_SI = clamp_swiglu_values(gate_up_SF, alpha=alpha, limit=limit, use_triton=use_triton)
        ctx.save_for_backward(gate_up_SF)
        ctx.alpha, ctx.limit, ctx.use_triton = alpha, limit, use_triton
        return out_SI

    @staticmethod
    def backward(ctx: Any, grad_SI: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        """Gradient of the input, the activation recomputed from it.

        Args:
            ctx: autograd context.
            grad_SI: gradient of the activation ``[S, F / 2]``.
        """
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (gate_up_SF,) = ctx.saved_tensors
        if ctx.use_triton:
            grad_SI = grad_SI.to(gate_up_SF.dtype).contiguous()
            grad_SF = _triton_kernels().clamp_swiglu_backward(gate_up_SF, grad_SI, ctx.alpha, ctx.limit)
        else:
            grad_SF = torch_clamp_swiglu_backward(gate_up_SF, grad_SI, ctx.alpha, ctx.limit)
        return grad_SF, None, None, None


def torch_clamp_swiglu_forward(gate_up_SF: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """The activation in PyTorch, computed in at least float32, without autograd bookkeeping.

    Args:
        gate_up_SF: ``[S, F]``, gate and up columns interleaved.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        ``[S, F / 2]`` in the dtype of ``gate_up_SF``.
    """
    gate_SI, up_SI = _clamped(gate_up_SF, limit)
    return ((up_SI + 1) * (gate_SI * torch.sigmoid(gate_SI * alpha))).to(gate_up_SF.dtype)


def torch_clamp_swiglu_backward(
    gate_up_SF: torch.Tensor, grad_SI: torch.Tensor, alpha: float, limit: float
) -> torch.Tensor:
    """Input gradient of ``torch_clamp_swiglu_forward``, recomputing the activation.

    Args:
        gate_up_SF: the forward's input ``[S, F]``.
        grad_SI: gradient of the activation ``[S, F / 2]``.
        alpha: sigmoid scale of the gate.
        limit: clamp limit.

    Returns:
        ``[S, F]`` in the dtype of ``gate_up_SF``.
    """
    gate_SI, up_SI = _clamped(gate_up_SF, limit)
    grad_SI = grad_SI.to(gate_SI.dtype)
    sig_SI = torch.sigmoid(gate_SI * alpha)
    grad_glu_SI = grad_SI * (up_SI + 1)
    grad_gate_SI = grad_glu_SI * (sig_SI + gate_SI * sig_SI * (1 - sig_SI) * alpha)
    grad_up_SI = grad_SI * (gate_SI * sig_SI)
    # torch.clamp's backward passes the gradient where min <= x <= max (bounds included, NaN excluded).
    gate_in_SI, up_in_SI = gate_up_SF[..., 0::2], gate_up_SF[..., 1::2]
    grad_gate_SI = torch.where(gate_in_SI <= limit, grad_gate_SI, 0.0)
    grad_up_SI = torch.where((up_in_SI >= -limit) & (up_in_SI <= limit), grad_up_SI, 0.0)
    return torch.stack((grad_gate_SI, grad_up_SI), dim=-1).reshape(gate_up_SF.shape).to(gate_up_SF.dtype)


def _clamped(gate_up_SF: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped gate and up columns ``[S, F / 2]`` in at least float32 (new tensors)."""
    compute = torch.promote_types(gate_up_SF.dtype, torch.float32)
    gate_SI = gate_up_SF[..., 0::2].to(compute).clamp(max=limit)
    up_SI = gate_up_SF[..., 1::2].to(compute).clamp(min=-limit, max=limit)
    return gate_SI, up_SI


def _triton_kernels() -> Any:
    """The Triton kernel module, imported on first use so that this module needs no Triton on CPU-only installs."""
    return importlib.import_module("osstune.kernels.swiglu_triton")
