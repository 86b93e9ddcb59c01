"""Grouped forward of gpt-oss experts, with LoRA updates computed as ``(X @ A) @ B``.

Tensor names carry their shape: T tokens, K experts per token, S = T * K (token, expert) pairs, E experts,
H hidden size, I the input and O the output width of one projection, R the LoRA rank.

The (token, expert) pairs are sorted by expert once per layer; every projection is then one grouped matmul over
contiguous row blocks (``torch.nn.functional.grouped_mm`` on CUDA), or, where that kernel does not apply (CPU,
float32, unaligned widths), a loop over the experts' row blocks that computes the same function. The LoRA update
is never added to the expert weights: for expert e, ``y = x @ W[e] + b[e] + scaling * (x @ A[e]) @ B[e]``.
The elementwise work between the matmuls is fused (``osstune.kernels.moe``): the gate/up bias and LoRA update are
added inside the activation's pass, and the down bias, routing weights and sum over each token's experts are one
pass that gathers the token's rows (as is the input gradient of the rows gathered for the experts, ``gather_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

from osstune.kernels.moe import combine_experts, gate_activation
from osstune.kernels.swiglu import clamp_swiglu, clamp_swiglu_values

GROUPED_MM_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
"""Dtypes for which the CUDA grouped matmul kernel is used."""

GROUPED_MM_ALIGN_BYTES = 16
"""The CUDA grouped matmul kernel needs every row stride to be a multiple of this many bytes."""


class ExpertWeights(Protocol):
    """A stack of expert weights ``[E, I, O]`` held in another form than one dense tensor (e.g. MXFP4 codes).

    ``experts_forward`` accepts it wherever it takes a dense stack: it reads ``shape`` and ``dtype`` and lets the
    stack multiply the routed rows itself.
    """

    @property
    def shape(self) -> torch.Size:
        """The logical shape ``[E, I, O]``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are computed in."""
        ...

    def matmul(self, x_SI: torch.Tensor, ends_E: torch.Tensor, grouped: bool) -> torch.Tensor:
        """``out[s] = x_SI[s] @ W[e]`` for the expert e owning row s (as ``grouped_matmul``), [S, O].

        Args:
            x_SI: rows sorted by expert, [S, I].
            ends_E: int32 end row of each expert's block, [E].
            grouped: use the grouped matmul kernel, else loop over the experts' blocks.
        """
        ...


@dataclass(frozen=True)
class LoraFactors:
    """Low-rank update of a stack of expert weights: expert e computes ``x @ (W[e] + scaling * a[e] @ b[e])``.

    Args:
        a_EIR: first factor, [experts, in, rank]; the input is multiplied by it first.
        b_ERO: second factor, [experts, rank, out].
        scaling: multiplier of the update (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
    """

    a_EIR: torch.Tensor
    b_ERO: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class ExpertRouting:
    """The (token, expert) pairs of one batch, sorted by expert.

    Args:
        token_S: the token each sorted pair reads, [S].
        pair_S: each sorted pair's position in the flattened ``[T * K]`` routing tensors, [S].
        expert_S: the expert of each sorted pair, ascending, [S].
        ends_E: int32 end row of each expert's block: expert e owns rows ``ends_E[e - 1]:ends_E[e]``, [E].
    """

    token_S: torch.Tensor
    pair_S: torch.Tensor
    expert_S: torch.Tensor
    ends_E: torch.Tensor


def route_by_expert(router_indices_TK: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Sort the (token, expert) pairs chosen by the router by expert, without synchronising with the host.

    Args:
        router_indices_TK: expert ids chosen for each token, [T, K], integer.
        num_experts: number of experts E of the layer.

    Returns:
        The sorted pairs; pairs of one expert keep their token order.
    """
    top_k = router_indices_TK.shape[-1]
    expert_flat = router_indices_TK.reshape(-1)
    pair_S = torch.argsort(expert_flat, stable=True)
    expert_S = expert_flat[pair_S]
    bounds_E = torch.arange(1, num_experts + 1, device=expert_S.device, dtype=expert_S.dtype)
    ends_E = torch.searchsorted(expert_S, bounds_E).to(torch.int32)
    return ExpertRouting(token_S=pair_S // top_k, pair_S=pair_S, expert_S=expert_S, ends_E=ends_E)


class GatherRows(torch.autograd.Function):
    """``hidden_TH[token_S]``, whose gradient sums each token's K rows in one gathering pass (``combine_experts``
    with unit weights, accumulated in float32) instead of an atomic scatter-add in the rows' dtype."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden_TH: torch.Tensor, routing: ExpertRouting,
                top_k: int) -> torch.Tensor:
        ctx.save_for_backward(routing.expert_S, routing.pair_S)
        ctx.top_k, ctx.num_tokens = top_k, hidden_TH.shape[0]
        return hidden_TH.index_select(0, routing.token_S)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_SH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert_S, pair_S = ctx.saved_tensors
        ones_TK = grad_SH.new_ones(ctx.num_tokens, ctx.top_k)
        grad_TH = combine_experts(grad_SH, None, expert_S, pair_S, ones_TK, ctx.num_tokens, ctx.top_k)
        return grad_TH, None, None


def gather_rows(hidden_TH: torch.Tensor, routing: ExpertRouting, top_k: int) -> torch.Tensor:
    """Each routed pair's token state, in expert order: ``hidden_TH[routing.token_S]``, ``[S, H]``.

    Differentiable in ``hidden_TH``: the gradient of token t is the sum of its K rows' gradients, gathered and
    summed in float32 once (deterministic), not scattered with atomics.

    Args:
        hidden_TH: token states, [T, H].
        routing: the layer's routing (``route_by_expert``), S = T * K rows.
        top_k: experts per token K.
    """
    if hidden_TH.requires_grad and torch.is_grad_enabled():
        return GatherRows.apply(hidden_TH, routing, top_k)
    return hidden_TH.index_select(0, routing.token_S)


def grouped_mm_applies(x_SI: torch.Tensor, w_EIO: torch.Tensor | ExpertWeights) -> bool:
    """Whether the CUDA grouped matmul kernel can compute ``x_SI`` times the stacked weights ``w_EIO``.

    Args:
        x_SI: the rows, sorted by expert, [S, I].
        w_EIO: the expert weights, [E, I, O], dense or an ``ExpertWeights``.

    Returns:
        True on CUDA for float16/bfloat16 operands of one dtype whose widths I and O are 16-byte aligned.
    """
    if x_SI.device.type != "cuda" or x_SI.dtype not in GROUPED_MM_DTYPES or w_EIO.dtype != x_SI.dtype:
        return False
    step = GROUPED_MM_ALIGN_BYTES // x_SI.element_size()
    return w_EIO.shape[1] % step == 0 and w_EIO.shape[2] % step == 0


def grouped_matmul(x_SI: torch.Tensor, w_EIO: torch.Tensor, ends_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Multiply each expert's block of rows by that expert's weight.

    Args:
        x_SI: rows sorted by expert, [S, I].
        w_EIO: expert weights, [E, I, O]; a weight that does not require grad gets no gradient computed.
        ends_E: int32 end row of each expert's block, [E] (see ``ExpertRouting``).
        grouped: use the grouped matmul kernel (one launch, no host sync); otherwise loop over the experts'
            blocks (one host sync to read ``ends_E``).

    Returns:
        ``out[s] = x_SI[s] @ w_EIO[e]`` for the expert e owning row s, [S, O].
    """
    if grouped:
        kernel = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return kernel(x_SI, w_EIO, offs=ends_E)
    ends = ends_E.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x_SI[start:end] @ w_EIO[e] for e, (start, end) in enumerate(zip(starts, ends))])


def expert_weight_grad(x_SI: torch.Tensor, grad_SO: torch.Tensor, ends_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """The gradient of stacked expert weights in ``grouped_matmul(x_SI, w_EIO, ends_E)``: ``x[e].T @ grad[e]`` per
    expert's row block, zero for experts without rows.

    Args:
        x_SI: the product's rows, sorted by expert, [S, I].
        grad_SO: the product's gradient, [S, O].
        ends_E: int32 end row of each expert's block, [E].
        grouped: one grouped kernel launch (no host sync); otherwise a loop over the blocks (one host sync).

    Returns:
        [E, I, O] in the dtype of ``x_SI``.
    """
    if grouped:
        kernel = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return kernel(x_SI.transpose(0, 1), grad_SO, offs=ends_E)
    ends = ends_E.tolist()
    blocks = [x_SI[start:end].T @ grad_SO[start:end] for start, end in zip([0, *ends[:-1]], ends)]
    return torch.stack(blocks) if blocks else x_SI.new_zeros(0, x_SI.shape[1], grad_SO.shape[1])  # no experts


@dataclass(frozen=True)
class Rebuild:
    """How the backward pass rebuilds the input of a LoRA product from tensors the layer keeps anyway, so that the
    product keeps no copy of its own: ``fn(*sources)`` must return exactly that input.

    Args:
        fn: the rebuilding function (it must hold no tensors itself: they would escape activation checkpointing).
        sources: the tensors it reads.
    """

    fn: Callable[..., torch.Tensor]
    sources: tuple[torch.Tensor, ...]


class RebuiltInputMatmul(torch.autograd.Function):
    """``grouped_matmul(x_SI, a_EIR)`` that saves ``rebuild.sources`` in place of ``x_SI`` (see ``Rebuild``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x_SI: torch.Tensor, a_EIR: torch.Tensor,
                ends_E: torch.Tensor, grouped: bool, fn: Callable[..., torch.Tensor],
                *sources: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a_EIR, ends_E, *sources)
        ctx.grouped, ctx.fn = grouped, fn
        return grouped_matmul(x_SI, a_EIR, ends_E, grouped)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_SR: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a_EIR, ends_E, *sources = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        # In the product's dtype (autocast may have run the forward in a lower one than x's or A's); autograd casts
        # the gradients back to their inputs' dtypes.
        grad_SR = grad_SR.contiguous()
        grad_x = grad_a = None
        if need_x:
            grad_x = grouped_matmul(grad_SR, a_EIR.to(grad_SR.dtype).transpose(1, 2), ends_E, ctx.grouped)
        if need_a:
            x_SI = ctx.fn(*sources).to(grad_SR.dtype)
            grad_a = expert_weight_grad(x_SI, grad_SR, ends_E, ctx.grouped)
        return grad_x, grad_a, None, None, None, *(None for _ in sources)


def lora_input_matmul(x_SI: torch.Tensor, a_EIR: torch.Tensor, routing: ExpertRouting, grouped: bool,
                      rebuild: Rebuild | None) -> torch.Tensor:
    """``x @ A[e]`` per expert's row block, the first product of a LoRA update.

    Args:
        x_SI: rows sorted by expert, [S, I].
        a_EIR: the first factors, [E, I, R], in the dtype of ``x_SI``.
        routing: the sorted pairs the rows belong to.
        grouped: use the grouped matmul kernel (see ``grouped_matmul``).
        rebuild: how the backward pass rebuilds ``x_SI`` (then only its sources are kept), or None to keep it.
    """
    if rebuild is None or not torch.is_grad_enabled() or not (x_SI.requires_grad or a_EIR.requires_grad):
        return grouped_matmul(x_SI, a_EIR, routing.ends_E, grouped)
    return RebuiltInputMatmul.apply(x_SI, a_EIR, routing.ends_E, grouped, rebuild.fn, *rebuild.sources)


def gathered_rows(hidden_TH: torch.Tensor, pair_S: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """``hidden_TH[pair_S // top_k]``: the rows ``gather_rows`` gathered, rebuilt from the sorted pairs (a
    ``Rebuild`` function)."""
    return hidden_TH.index_select(0, pair_S // top_k)


def pad_rank(factors: LoraFactors, multiple: int) -> LoraFactors:
    """Pad the rank of a LoRA update with zeros up to a multiple, leaving the update unchanged.

    Args:
        factors: the update.
        multiple: the rank is rounded up to a multiple of this.

    Returns:
        ``factors`` itself when the rank already is a multiple, else zero-padded contiguous factors.
    """
    pad = -factors.a_EIR.shape[-1] % multiple
    if pad == 0:
        return factors
    return LoraFactors(
        a_EIR=F.pad(factors.a_EIR, (0, pad)).contiguous(),
        b_ERO=F.pad(factors.b_ERO, (0, 0, 0, pad)).contiguous(),
        scaling=factors.scaling,
    )


def expert_matmul(
    x_SI: torch.Tensor, w_EIO: torch.Tensor | ExpertWeights, routing: ExpertRouting, grouped: bool
) -> torch.Tensor:
    """The base product ``x @ W[e]`` of each row with its expert's weight.

    Args:
        x_SI: rows sorted by expert, [S, I], in the dtype of ``w_EIO``.
        w_EIO: expert weights, [E, I, O], dense or an ``ExpertWeights`` (which then multiplies itself).
        routing: the sorted pairs the rows belong to.
        grouped: use the grouped matmul kernel (see ``grouped_matmul``).

    Returns:
        The products, [S, O], a new tensor that no autograd node keeps (callers may modify it in place).
    """
    if isinstance(w_EIO, torch.Tensor):
        return grouped_matmul(x_SI, w_EIO, routing.ends_E, grouped)
    return w_EIO.matmul(x_SI, routing.ends_E, grouped)


def lora_product(
    x_SI: torch.Tensor, dtype: torch.dtype, routing: ExpertRouting, loras: Sequence[LoraFactors], grouped: bool,
    rebuild: Rebuild | None = None,
) -> torch.Tensor | None:
    """The LoRA updates of one projection, ``sum over loras of scaling * (x @ A[e]) @ B[e]``.

    Args:
        x_SI: rows sorted by expert, [S, I].
        dtype: the projection's compute dtype; the factors are cast to it.
        routing: the sorted pairs the rows belong to.
        loras: the LoRA updates (one per active adapter).
        grouped: use the grouped matmul kernel (see ``grouped_matmul``); the LoRA rank is then zero-padded to the
            kernel's alignment.
        rebuild: how the backward pass rebuilds ``x_SI`` from tensors kept anyway (``Rebuild``), or None to keep it.

    Returns:
        The summed updates, [S, O], or None without LoRA.
    """
    total_SO: torch.Tensor | None = None
    for factors in loras:
        factors = LoraFactors(
            a_EIR=factors.a_EIR.to(dtype), b_ERO=factors.b_ERO.to(dtype).contiguous(), scaling=factors.scaling
        )
        if grouped:
            factors = pad_rank(factors, GROUPED_MM_ALIGN_BYTES // dtype.itemsize)
        mid_SR = lora_input_matmul(x_SI, factors.a_EIR, routing, grouped, rebuild) * factors.scaling
        update_SO = grouped_matmul(mid_SR, factors.b_ERO, routing.ends_E, grouped)
        # In-place adds are safe: no matmul keeps its output for the backward pass.
        total_SO = update_SO if total_SO is None else total_SO.add_(update_SO)
    return total_SO


def expert_linear(
    x_SI: torch.Tensor,
    w_EIO: torch.Tensor | ExpertWeights,
    bias_EO: torch.Tensor | None,
    routing: ExpertRouting,
    loras: Sequence[LoraFactors],
    grouped: bool,
    rebuild: Rebuild | None = None,
) -> torch.Tensor:
    """One expert projection with LoRA: ``x @ W[e] + b[e] + sum over loras of scaling * (x @ A[e]) @ B[e]``.

    Args:
        x_SI: rows sorted by expert, [S, I], in the dtype of ``w_EIO``.
        w_EIO: expert weights, [E, I, O], dense or an ``ExpertWeights`` (which then computes ``x @ W[e]`` itself).
        bias_EO: expert biases, [E, O], or None.
        routing: the sorted pairs the rows belong to.
        loras: LoRA updates of ``w_EIO``, summed (one per active adapter); their factors are cast to the dtype
            of ``w_EIO``.
        grouped: use the grouped matmul kernel (see ``grouped_matmul``); the LoRA rank is then zero-padded to the
            kernel's alignment.
        rebuild: how the backward pass rebuilds ``x_SI`` for the LoRA factors' gradient, or None to keep it.

    Returns:
        The projected rows, [S, O].
    """
    # In-place adds are safe: no matmul keeps its output for the backward pass.
    out_SO = expert_matmul(x_SI, w_EIO, routing, grouped)
    if bias_EO is not None:
        out_SO.add_(bias_EO.index_select(0, routing.expert_S))
    update_SO = lora_product(x_SI, w_EIO.dtype, routing, loras, grouped, rebuild)
    if update_SO is not None:
        out_SO.add_(update_SO)
    return out_SO


@dataclass(frozen=True)
class ClampSwiGLUGate:
    """gpt-oss's clamped SwiGLU as the ``apply_gate`` of ``experts_forward``, which then runs it fused.

    Called on its own it is ``clamp_swiglu``; given to ``experts_forward`` it makes the gate/up bias and LoRA
    additions and the activation one pass (``osstune.kernels.moe.gate_activation``).

    Args:
        alpha: sigmoid scale of the gate (``GptOssExperts.alpha``, 1.702 for gpt-oss).
        limit: clamp limit (``GptOssExperts.limit``, 7.0 for gpt-oss).
    """

    alpha: float
    limit: float

    def __call__(self, gate_up_SF: torch.Tensor) -> torch.Tensor:
        """The activation ``[..., F] -> [..., F / 2]`` (see ``clamp_swiglu``).

        Args:
            gate_up_SF: the gate/up projection, gate and up columns interleaved.
        """
        return clamp_swiglu(gate_up_SF, alpha=self.alpha, limit=self.limit)


def experts_forward(
    hidden_TH: torch.Tensor,
    router_indices_TK: torch.Tensor,
    routing_weights_TK: torch.Tensor,
    *,
    gate_up_EHF: torch.Tensor | ExpertWeights,
    gate_up_bias_EF: torch.Tensor | None,
    down_EIH: torch.Tensor | ExpertWeights,
    down_bias_EH: torch.Tensor | None,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    gate_up_loras: Sequence[LoraFactors] = (),
    down_loras: Sequence[LoraFactors] = (),
    grouped: bool | None = None,
) -> torch.Tensor:
    """The mixture of experts of one gpt-oss layer, with optional LoRA updates on both projections.

    With a ``ClampSwiGLUGate`` as ``apply_gate``, the gate/up bias and LoRA update are added and the activation
    computed in one fused pass (``gate_activation``); any other ``apply_gate`` gets the full projection, bias and
    LoRA included. Either way the down projection's bias, the routing weights and the sum over each token's experts
    are one fused pass (``combine_experts``).

    Args:
        hidden_TH: token states, [T, H].
        router_indices_TK: experts chosen per token, [T, K].
        routing_weights_TK: weight of each chosen expert, [T, K].
        gate_up_EHF: gate/up weights, [E, H, F] with F = 2 * intermediate (gate and up columns interleaved), dense
            or an ``ExpertWeights``.
        gate_up_bias_EF: gate/up biases, [E, F], or None.
        down_EIH: down weights, [E, intermediate, H], dense or an ``ExpertWeights``.
        down_bias_EH: down biases, [E, H], or None.
        apply_gate: the activation, [S, F] -> [S, intermediate]: a ``ClampSwiGLUGate`` (fused), or any function
            (e.g. ``GptOssExperts._apply_gate``).
        gate_up_loras: LoRA updates of ``gate_up_EHF``.
        down_loras: LoRA updates of ``down_EIH``.
        grouped: force (True) or forbid (False) the grouped matmul kernel; None uses it where it applies
            (CUDA, float16/bfloat16, aligned widths), which keeps the forward free of host syncs.

    Returns:
        The routing-weighted sum of each token's expert outputs, [T, H], in the dtype of ``hidden_TH`` (summed in
        at least float32).
    """
    num_tokens, top_k = router_indices_TK.shape
    routing = route_by_expert(router_indices_TK, gate_up_EHF.shape[0])
    input_TH = hidden_TH.to(gate_up_EHF.dtype)
    x_SH = gather_rows(input_TH, routing, top_k)
    if grouped is None:
        grouped = grouped_mm_applies(x_SH, gate_up_EHF) and grouped_mm_applies(x_SH, down_EIH)
    # The LoRA products keep no copy of their inputs: the gathered rows are gathered again from the layer's input,
    # the activation is computed again from the pre-activation its own backward keeps.
    rows = Rebuild(partial(gathered_rows, top_k=top_k), (input_TH, routing.pair_S))
    act_rebuild = None
    if isinstance(apply_gate, ClampSwiGLUGate):
        act_SI, pre_SF = gate_activation(
            expert_matmul(x_SH, gate_up_EHF, routing, grouped),
            lora_product(x_SH, gate_up_EHF.dtype, routing, gate_up_loras, grouped, rows),
            gate_up_bias_EF,
            routing.expert_S,
            alpha=apply_gate.alpha,
            limit=apply_gate.limit,
            with_pre=True,
        )
        act_rebuild = Rebuild(partial(clamp_swiglu_values, alpha=apply_gate.alpha, limit=apply_gate.limit), (pre_SF,))
    else:
        act_SI = apply_gate(expert_linear(x_SH, gate_up_EHF, gate_up_bias_EF, routing, gate_up_loras, grouped, rows))
    down_SH = expert_linear(act_SI, down_EIH, None, routing, down_loras, grouped, act_rebuild)
    return combine_experts(
        down_SH,
        down_bias_EH,
        routing.expert_S,
        routing.pair_S,
        routing_weights_TK,
        num_tokens,
        top_k,
        out_dtype=hidden_TH.dtype,
    )
