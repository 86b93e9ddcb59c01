"""gate_activation and combine_experts against float64 autograd references, and the fused experts_forward against
transformers' eager ``GptOssExperts``. The Triton kernels run in Triton's interpreter (float32/float16)."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.kernels import moe
from osstune.kernels.moe import combine_experts, gate_activation
from osstune.kernels.swiglu import clamp_swiglu, clamp_swiglu_values
from osstune.models.gpt_oss import experts as experts_module
from osstune.models.gpt_oss.experts import (
    ClampSwiGLUGate,
    ExpertRouting,
    experts_forward,
    gather_rows,
    route_by_expert,
)


ALPHA, LIMIT = 1.702, 7.0
INTERPRETER_EXP_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy
STORAGE_TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}
"""Relative tolerance against float64: float32 math inside, one rounding to the storage dtype (half an ulp)."""


def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' activation, unchanged, with gpt-oss's constants."""
    return GptOssExperts._apply_gate(SimpleNamespace(alpha=ALPHA, limit=LIMIT), gate_up)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float64 normal values."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def routing_of(tokens: int, top_k: int, experts: int, seed: int = 0) -> tuple[torch.Tensor, ExpertRouting]:
    """Router indices ``[T, K]`` with K distinct experts per token, the last expert never chosen, and their routing."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
    indices = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.long)
    return indices, route_by_expert(indices, experts)


# ---------------------------------------------------------------------------------------------- gate_activation


def gate_inputs(
    rows: int, width: int, experts: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """base ``[S, F]`` (spread past the clamps), lora ``[S, F]``, bias ``[E, F]`` and sorted experts ``[S]``."""
    base = rand(rows, width, seed=seed, scale=5.0).to(dtype)
    lora = rand(rows, width, seed=seed + 1).to(dtype)
    bias = rand(experts, width, seed=seed + 2).to(dtype)
    expert = torch.randint(0, experts - 1, (rows,), generator=torch.Generator().manual_seed(seed + 3)).sort().values
    return base, lora, bias, expert


def gate_reference(
    pre: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_apply_gate`` of a pre-activation and its autograd gradient, in float64."""
    x = pre.detach().double().requires_grad_(True)
    out = apply_gate(x)
    out.backward(grad_out.double())
    assert x.grad is not None
    return out.detach(), x.grad


def exact_pre(
    base: torch.Tensor, lora: torch.Tensor | None, bias: torch.Tensor | None, expert: torch.Tensor
) -> torch.Tensor:
    """``base + bias[expert] + lora`` in float64, from the (possibly rounded) inputs."""
    pre = base.double().clone()
    if bias is not None:
        pre += bias.double()[expert]
    if lora is not None:
        pre += lora.double()
    return pre


def run_gate(
    base: torch.Tensor,
    lora: torch.Tensor | None,
    bias: torch.Tensor | None,
    expert: torch.Tensor,
    grad_out: torch.Tensor,
    use_triton: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``gate_activation`` forward and backward: activation, what base_SF holds after it, grads of base and lora."""
    base_leaf = base.detach().clone().requires_grad_(True)
    lora_leaf = None if lora is None else lora.detach().clone().requires_grad_(True)
    base_SF = base_leaf.clone()  # not a leaf: gate_activation overwrites it
    act = gate_activation(base_SF, lora_leaf, bias, expert, alpha=ALPHA, limit=LIMIT, use_triton=use_triton)
    act.backward(grad_out.to(act.dtype))
    assert base_leaf.grad is not None
    return act.detach(), base_SF.detach(), base_leaf.grad, None if lora_leaf is None else lora_leaf.grad


@pytest.mark.parametrize(("with_lora", "with_bias"), [(True, True), (True, False), (False, True), (False, False)])
def test_gate_torch_path_equals_the_float64_reference(with_lora: bool, with_bias: bool):
    base, lora, bias, expert = gate_inputs(9, 46, 4, torch.float64)
    lora = lora if with_lora else None
    bias = bias if with_bias else None
    grad_out = rand(9, 23, seed=7)
    act, stored, grad_base, grad_lora = run_gate(base, lora, bias, expert, grad_out, use_triton=False)
    pre = exact_pre(base, lora, bias, expert)
    ref_act, ref_grad = gate_reference(pre, grad_out)
    assert torch.equal(stored, pre)  # base_SF now holds the pre-activation, added in the same order
    assert (pre.abs() > LIMIT).any()  # the clamps are exercised
    torch.testing.assert_close(act, ref_act, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad_base, ref_grad, rtol=1e-13, atol=1e-14)
    if with_lora:
        assert torch.equal(grad_lora, grad_base)
    else:
        assert grad_lora is None


def test_gate_clamps_apply_to_the_sum():
    # (gate, up) pairs whose base alone is inside the limits: the LoRA product moves gate to 7 (still passes its
    # gradient), gate to 7.5 (stops), up to -7 (passes) and up to -7.5 (stops).
    base = torch.tensor([[6.5, 1.0, 7.0, 1.0, 2.0, -6.5, 2.0, -7.0]], dtype=torch.float64)
    lora = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0, -0.5, 0.0, -0.5]], dtype=torch.float64)
    expert = torch.zeros(1, dtype=torch.long)
    act, _, grad, _ = run_gate(base, lora, None, expert, torch.ones(1, 4, dtype=torch.float64), use_triton=False)
    sig7 = 1 / (1 + torch.exp(torch.tensor(-ALPHA * LIMIT, dtype=torch.float64)))
    assert act[0, 0].item() == pytest.approx(2 * LIMIT * sig7.item(), rel=1e-15)
    assert act[0, 1].item() == pytest.approx(2 * LIMIT * sig7.item(), rel=1e-15)  # gate 7.5 clamped to 7
    assert grad[0, 0].item() == pytest.approx(2 * (sig7 + LIMIT * sig7 * (1 - sig7) * ALPHA).item(), rel=1e-14)
    assert grad[0, 2].item() == 0.0 and grad[0, 1].item() != 0.0
    assert grad[0, 5].item() != 0.0 and grad[0, 7].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gate_torch_path_is_accurate_to_the_storage_dtype(dtype: torch.dtype):
    base, lora, bias, expert = gate_inputs(16, 64, 3, dtype)
    grad_out = rand(16, 32, seed=8).to(dtype)
    act, stored, grad_base, grad_lora = run_gate(base, lora, bias, expert, grad_out, use_triton=False)
    tol = STORAGE_TOLERANCES[dtype]
    pre = exact_pre(base, lora, bias, expert)
    assert act.dtype == stored.dtype == grad_base.dtype == dtype
    torch.testing.assert_close(stored.double(), pre, rtol=tol, atol=0)  # the pre-activation, rounded once
    # The activation and the backward are both taken at the stored pre-activation, so that the activation can be
    # rebuilt from it bit for bit.
    ref_act, ref_grad = gate_reference(stored, grad_out)
    torch.testing.assert_close(act.double(), ref_act, rtol=tol, atol=1e-6)
    assert torch.equal(act, clamp_swiglu_values(stored, alpha=ALPHA, limit=LIMIT))
    torch.testing.assert_close(grad_base.double(), ref_grad, rtol=tol, atol=1e-6)
    assert torch.equal(grad_lora, grad_base)


def test_gate_saves_only_the_pre_activation_held_by_base():
    base, lora, bias, expert = gate_inputs(8, 32, 3, torch.float32)
    base_SF = base.clone().requires_grad_(True).clone()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gate_activation(base_SF, lora.requires_grad_(True), bias, expert, alpha=ALPHA, limit=LIMIT)
    assert len(saved) == 1 and saved[0].data_ptr() == base_SF.data_ptr() and saved[0].shape == (8, 32)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        gate_activation(base.clone().requires_grad_(True), None, bias, expert, alpha=ALPHA, limit=LIMIT)


def test_gate_bias_that_requires_grad_falls_back_to_autograd():
    base, lora, bias, expert = gate_inputs(10, 12, 3, torch.float64)
    grad_out = rand(10, 6, seed=9)
    base_SF = base.clone().requires_grad_(True).clone()
    bias_leaf = bias.clone().requires_grad_(True)
    act = gate_activation(base_SF, lora, bias_leaf, expert, alpha=ALPHA, limit=LIMIT)
    act.backward(grad_out)
    assert torch.equal(base_SF, base)  # not overwritten on this path
    ref_bias = bias.clone().requires_grad_(True)
    ref = apply_gate(base + ref_bias[expert] + lora)
    ref.backward(grad_out)
    torch.testing.assert_close(act, ref, rtol=1e-13, atol=1e-14)
    assert bias_leaf.grad is not None and bias_leaf.grad[:2].abs().min() > 0  # experts 0 and 1 own rows
    torch.testing.assert_close(bias_leaf.grad, ref_bias.grad, rtol=1e-13, atol=1e-14)


def test_gate_without_rows_and_cpu_default(monkeypatch: pytest.MonkeyPatch):
    def no_triton() -> ModuleType:
        raise AssertionError("the Triton kernels were used for a CPU tensor")

    monkeypatch.setattr(moe, "_moe_kernels", no_triton)
    monkeypatch.setattr(moe, "_swiglu_kernels", no_triton)
    base, lora, bias, expert = gate_inputs(0, 6, 2, torch.float32)
    act, stored, grad_base, grad_lora = run_gate(base, lora, bias, expert, torch.zeros(0, 3), use_triton=None)
    assert act.shape == (0, 3) and grad_base.shape == (0, 6) and grad_lora is not None
    base, lora, bias, expert = gate_inputs(5, 6, 2, torch.float32)
    act, *_ = run_gate(base, lora, bias, expert, torch.ones(5, 3), use_triton=None)
    assert act.shape == (5, 3)


def test_gate_rejects_inconsistent_inputs():
    base, lora, bias, expert = gate_inputs(4, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="F even"):
        gate_activation(base[:, :7], None, None, expert, alpha=ALPHA, limit=LIMIT)
    with pytest.raises(ValueError, match="LoRA product has shape"):
        gate_activation(base, lora[:3], None, expert, alpha=ALPHA, limit=LIMIT)
    with pytest.raises(ValueError, match=r"bias must be \[E, 8\]"):
        gate_activation(base, None, bias[:, :6], expert, alpha=ALPHA, limit=LIMIT)
    with pytest.raises(ValueError, match=r"expert_S must be \[4\]"):
        gate_activation(base, None, bias, expert[:3], alpha=ALPHA, limit=LIMIT)
    with pytest.raises(ValueError, match="Triton expert kernels take"):
        gate_activation(base.double(), None, None, expert, alpha=ALPHA, limit=LIMIT, use_triton=True)


@INTERPRETER_EXP_OVERFLOW
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2**-10)])
@pytest.mark.parametrize(("rows", "width"), [(37, 200), (1, 2), (33, 130), (0, 12)])
def test_gate_triton_kernel_matches_float64_reference(
    moe_kernels: ModuleType, swiglu_kernels: ModuleType, dtype: torch.dtype, tol: float, rows: int, width: int
):
    # Partial row and column tiles (the tile is 32 rows x 64 pairs), a single pair, no rows at all.
    assert moe_kernels.GATE_BLOCK_ROWS == 32 and moe_kernels.GATE_BLOCK_OUT_COLS == 64
    base, lora, bias, expert = gate_inputs(rows, width, 4, dtype, seed=rows)
    grad_out = rand(rows, width // 2, seed=11).to(dtype)
    act, stored, grad_base, grad_lora = run_gate(base, lora, bias, expert, grad_out, use_triton=True)
    pre = exact_pre(base, lora, bias, expert)
    ref_act, ref_grad = gate_reference(stored, grad_out)  # both at the stored pre-activation
    assert act.dtype == stored.dtype == grad_base.dtype == dtype
    torch.testing.assert_close(stored.double(), pre, rtol=tol, atol=1e-6)
    torch.testing.assert_close(act.double(), ref_act, rtol=tol, atol=1e-6)
    assert torch.equal(act, swiglu_kernels.clamp_swiglu_forward(stored.contiguous(), ALPHA, LIMIT))  # rebuildable
    torch.testing.assert_close(grad_base.double(), ref_grad, rtol=tol, atol=1e-6)
    assert torch.equal(grad_lora, grad_base)


@INTERPRETER_EXP_OVERFLOW
@pytest.mark.parametrize(("with_lora", "with_bias"), [(True, False), (False, True), (False, False)])
def test_gate_triton_kernel_without_lora_or_bias(
    moe_kernels: ModuleType, swiglu_kernels: ModuleType, with_lora: bool, with_bias: bool
):
    base, lora, bias, expert = gate_inputs(35, 140, 3, torch.float32, seed=4)
    lora = lora if with_lora else None
    bias = bias if with_bias else None
    grad_out = rand(35, 70, seed=12).float()
    act, stored, grad_base, _ = run_gate(base, lora, bias, expert, grad_out, use_triton=True)
    torch_act, torch_stored, torch_grad, _ = run_gate(base, lora, bias, expert, grad_out, use_triton=False)
    assert torch.equal(stored, torch_stored)  # one float32 rounding of the same sum
    torch.testing.assert_close(act, torch_act, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_base, torch_grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- combine_experts


def combine_reference(
    down: torch.Tensor,
    bias: torch.Tensor | None,
    routing: ExpertRouting,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The unfused formula: rows plus bias, times their weight, scattered to pair order, summed over K (float64)."""
    num_tokens, top_k = weights.shape
    rows = down + bias[routing.expert_S] if bias is not None else down
    weighted = rows * weights.reshape(-1)[routing.pair_S][:, None]
    pairs = torch.zeros_like(weighted).index_copy(0, routing.pair_S, weighted)
    return pairs.view(num_tokens, top_k, down.shape[1]).sum(dim=1)


def run_combine(
    down: torch.Tensor,
    bias: torch.Tensor | None,
    routing: ExpertRouting,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    use_triton: bool | None,
    reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums, and the gradients of the rows and of the weights (``combine_reference`` when ``reference``)."""
    down_leaf = down.detach().clone().requires_grad_(True)
    weights_leaf = weights.detach().clone().requires_grad_(True)
    num_tokens, top_k = weights.shape
    if reference:
        out = combine_reference(down_leaf, bias, routing, weights_leaf)
    else:
        out = combine_experts(
            down_leaf, bias, routing.expert_S, routing.pair_S, weights_leaf, num_tokens, top_k, use_triton
        )
    out.backward(grad_out.to(out.dtype))
    assert down_leaf.grad is not None and weights_leaf.grad is not None
    return out.detach(), down_leaf.grad, weights_leaf.grad


def combine_inputs(
    tokens: int, top_k: int, hidden: int, experts: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, ExpertRouting, torch.Tensor, torch.Tensor]:
    """Rows ``[T * K, H]``, bias ``[E, H]``, routing (last expert unused), softmax weights, upstream gradient."""
    _, routing = routing_of(tokens, top_k, experts, seed)
    down = rand(tokens * top_k, hidden, seed=seed + 1).to(dtype)
    bias = rand(experts, hidden, seed=seed + 2).to(dtype)
    weights = torch.softmax(rand(tokens, top_k, seed=seed + 3), dim=-1).to(dtype)
    grad_out = rand(tokens, hidden, seed=seed + 4).to(dtype)
    return down, bias, routing, weights, grad_out


def test_combine_small_example_by_hand():
    # Tokens 0 and 1 choose experts (1, 0) and (0, 1): sorted rows are (t0, e0), (t1, e0), (t0, e1), (t1, e1).
    routing = route_by_expert(torch.tensor([[1, 0], [0, 1]]), 2)
    assert routing.pair_S.tolist() == [1, 2, 0, 3] and routing.expert_S.tolist() == [0, 0, 1, 1]
    down = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    bias = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    out = combine_experts(down, bias, routing.expert_S, routing.pair_S, weights, 2, 2)
    # t0 = 0.25 * ([5, 6] + [0, -1]) + 0.75 * ([1, 2] + [0.5, 0]); t1 = 0.5 * ([3, 4] + [0.5, 0]) + 0.5 * ([7, 7]).
    assert out.tolist() == [[2.375, 2.75], [5.25, 5.5]]
    assert combine_experts(down, None, routing.expert_S, routing.pair_S, weights, 2, 2).tolist() == [
        [2.0, 3.0], [5.0, 6.0]
    ]  # fmt: skip


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("tokens", "top_k"), [(13, 3), (1, 1), (1, 4), (6, 1), (0, 2)])
def test_combine_torch_path_equals_the_float64_reference(with_bias: bool, tokens: int, top_k: int):
    down, bias, routing, weights, grad_out = combine_inputs(tokens, top_k, 10, 5, torch.float64)
    bias = bias if with_bias else None
    out, grad_down, grad_weights = run_combine(down, bias, routing, weights, grad_out, use_triton=False)
    ref_out, ref_down, ref_weights = run_combine(down, bias, routing, weights, grad_out, None, reference=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad_down, ref_down, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad_weights, ref_weights, rtol=1e-13, atol=1e-14)
    assert out.shape == (tokens, 10) and (tokens == 0 or grad_weights.abs().min() > 0)


def test_combine_accumulates_in_float32_and_rounds_once():
    down, bias, routing, weights, grad_out = combine_inputs(20, 4, 64, 6, torch.bfloat16)
    exact = combine_reference(down.double(), bias.double(), routing, weights.double())
    out = combine_experts(down, bias, routing.expert_S, routing.pair_S, weights, 20, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)
    wide = combine_experts(down, bias, routing.expert_S, routing.pair_S, weights, 20, 4, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.double(), exact, rtol=1e-6, atol=1e-6)
    _, grad_down, grad_weights = run_combine(down, bias, routing, weights, grad_out, use_triton=False)
    _, ref_down, ref_weights = run_combine(
        down.double(), bias.double(), routing, weights.double(), grad_out.double(), None, reference=True
    )
    assert grad_down.dtype == grad_weights.dtype == torch.bfloat16
    torch.testing.assert_close(grad_down.double(), ref_down, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(grad_weights.double(), ref_weights, rtol=2**-8, atol=1e-5)


def test_combine_keeps_the_rows_only_when_the_weights_need_a_gradient():
    down, bias, routing, weights, _ = combine_inputs(5, 2, 8, 3, torch.float32)
    for weights_grad in (True, False):
        down_SH = down.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            combine_experts(down_SH, bias, routing.expert_S, routing.pair_S,
                            weights.clone().requires_grad_(weights_grad), 5, 2)  # fmt: skip
        assert any(t.data_ptr() == down_SH.data_ptr() for t in saved) == weights_grad
        assert all(t.numel() <= down_SH.numel() for t in saved)


def test_combine_bias_that_requires_grad_falls_back_to_autograd():
    down, bias, routing, weights, grad_out = combine_inputs(7, 2, 6, 4, torch.float64)
    bias_leaf = bias.clone().requires_grad_(True)
    out = combine_experts(down, bias_leaf, routing.expert_S, routing.pair_S, weights, 7, 2)
    out.backward(grad_out)
    ref_bias = bias.clone().requires_grad_(True)
    ref = combine_reference(down, ref_bias, routing, weights)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)
    assert bias_leaf.grad is not None and bias_leaf.grad[-1].abs().max() == 0  # the unused expert
    torch.testing.assert_close(bias_leaf.grad, ref_bias.grad, rtol=1e-13, atol=1e-14)


def test_combine_rejects_inconsistent_inputs():
    down, bias, routing, weights, _ = combine_inputs(4, 2, 8, 3, torch.float32)
    with pytest.raises(ValueError, match=r"down_SH must be \[5 \* 2, H\]"):
        combine_experts(down, bias, routing.expert_S, routing.pair_S, weights, 5, 2)
    with pytest.raises(ValueError, match=r"pair_S and expert_S must be \[8\]"):
        combine_experts(down, bias, routing.expert_S[:7], routing.pair_S, weights, 4, 2)
    with pytest.raises(ValueError, match=r"weights_TK must be \[4, 2\]"):
        combine_experts(down, bias, routing.expert_S, routing.pair_S, weights.T, 4, 2)
    with pytest.raises(ValueError, match=r"down bias must be \[E, 8\]"):
        combine_experts(down, bias[:, :4], routing.expert_S, routing.pair_S, weights, 4, 2)
    with pytest.raises(ValueError, match="Triton expert kernels take"):
        combine_experts(down.double(), None, routing.expert_S, routing.pair_S, weights, 4, 2, use_triton=True)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2**-10)])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(13, 4, 150), (1, 1, 5), (33, 2, 130), (0, 4, 16)])
def test_combine_triton_kernels_match_float64_reference(
    moe_kernels: ModuleType, dtype: torch.dtype, tol: float, tokens: int, top_k: int, hidden: int
):
    # Partial token and column tiles (32 tokens x 128 columns forward; 16 rows, 128-column steps backward).
    assert moe_kernels.COMBINE_BLOCK_TOKENS == 32 and moe_kernels.COMBINE_BLOCK_HIDDEN == 128
    down, bias, routing, weights, grad_out = combine_inputs(tokens, top_k, hidden, 6, dtype, seed=tokens)
    out, grad_down, grad_weights = run_combine(down, bias, routing, weights, grad_out, use_triton=True)
    ref_out, ref_down, ref_weights = run_combine(
        down.double(), bias.double(), routing, weights.double(), grad_out.double(), None, reference=True
    )
    assert out.shape == (tokens, hidden) and out.dtype == grad_down.dtype == grad_weights.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=1e-5)
    torch.testing.assert_close(grad_down.double(), ref_down, rtol=tol, atol=1e-5)
    torch.testing.assert_close(grad_weights.double(), ref_weights, rtol=tol, atol=1e-4)


def test_combine_triton_kernels_without_bias_and_without_weight_gradient(moe_kernels: ModuleType):
    down, _, routing, weights, grad_out = combine_inputs(9, 2, 40, 4, torch.float32, seed=3)
    out, grad_down, grad_weights = run_combine(down, None, routing, weights, grad_out, use_triton=True)
    ref_out, ref_down, ref_weights = run_combine(down, None, routing, weights, grad_out, use_triton=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(grad_down, ref_down)  # one float32 product each
    torch.testing.assert_close(grad_weights, ref_weights, rtol=1e-6, atol=1e-6)
    down_leaf = down.clone().requires_grad_(True)
    fixed = combine_experts(down_leaf, None, routing.expert_S, routing.pair_S, weights, 9, 2, use_triton=True)
    fixed.backward(grad_out)
    assert torch.equal(down_leaf.grad, grad_down)


# ---------------------------------------------------------------------------------------------- gather_rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "top_k"), [(13, 3), (1, 4), (6, 1), (0, 2)])
def test_gather_rows_gradient_sums_each_tokens_rows_once(dtype: torch.dtype, tokens: int, top_k: int):
    _, routing = routing_of(tokens, top_k, 10, seed=tokens)
    hidden = rand(tokens, 6, seed=1).to(dtype).requires_grad_()
    grad_rows = rand(tokens * top_k, 6, seed=2).to(dtype)
    rows = gather_rows(hidden, routing, top_k)
    assert torch.equal(rows, hidden.detach()[routing.token_S])
    rows.backward(grad_rows)
    # float64 scatter-add of the same gradients, rounded once to the dtype (the kernel sums in float32 or more)
    expected = torch.zeros(tokens, 6, dtype=torch.float64).index_add_(0, routing.token_S, grad_rows.double())
    torch.testing.assert_close(hidden.grad, expected.to(dtype), rtol=STORAGE_TOLERANCES.get(dtype, 1e-13),
                               atol=1e-12)
    with torch.no_grad():
        assert torch.equal(gather_rows(hidden, routing, top_k), rows.detach())


# ---------------------------------------------------------------------------------------------- experts_forward

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, TOKENS = 16, 24, 5, 3, 11


def eager_experts(trainable_biases: bool) -> GptOssExperts:
    """transformers' eager experts in float64 with random weights large enough to reach the clamps."""
    config = GptOssConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        experts_implementation="eager",
    )
    module = GptOssExperts(config).double()
    with torch.no_grad():
        for seed, param in enumerate(module.parameters()):
            param.copy_(rand(*param.shape, seed=20 + seed, scale=0.6))
    module.gate_up_proj_bias.requires_grad_(trainable_biases)
    module.down_proj_bias.requires_grad_(trainable_biases)
    return module


def layer_output_and_grads(
    experts: GptOssExperts, forward
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output for fixed tokens and routing, and the gradients of a fixed projection of it wrt the hidden states, the
    routing weights and every trainable parameter."""
    indices, _ = routing_of(TOKENS, TOP_K, EXPERTS, seed=30)
    hidden = rand(TOKENS, HIDDEN, seed=31, scale=2.0).requires_grad_(True)
    weights = torch.softmax(rand(TOKENS, TOP_K, seed=32), dim=-1).requires_grad_(True)
    out = forward(hidden, indices, weights)
    probe = rand(TOKENS, HIDDEN, seed=33)
    params = [param for param in experts.parameters() if param.requires_grad]
    return out.detach(), list(torch.autograd.grad((out * probe).sum(), [hidden, weights, *params]))


def fused_forward(experts: GptOssExperts, apply_gate=None):
    """``experts_forward`` over the module's weights, with the fused gate unless another one is given."""

    def forward(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(
            hidden, indices, weights,
            gate_up_EHF=experts.gate_up_proj, gate_up_bias_EF=experts.gate_up_proj_bias,
            down_EIH=experts.down_proj, down_bias_EH=experts.down_proj_bias,
            apply_gate=apply_gate or ClampSwiGLUGate(alpha=experts.alpha, limit=experts.limit),
        )  # fmt: skip

    return forward


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls experts_forward makes to the fused functions."""
    calls = {"gate_activation": 0, "combine_experts": 0}
    for name in calls:
        original = getattr(experts_module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(experts_module, name, counted)
    return calls


@pytest.mark.parametrize("trainable_biases", [False, True])
def test_experts_forward_matches_transformers_eager_in_float64(
    trainable_biases: bool, monkeypatch: pytest.MonkeyPatch
):
    experts = eager_experts(trainable_biases)
    ref_out, ref_grads = layer_output_and_grads(experts, experts.forward)
    calls = count_calls(monkeypatch)
    out, grads = layer_output_and_grads(experts, fused_forward(experts))
    # combine_experts twice: the layer's output, and the input gradient of the gathered rows (gather_rows)
    assert calls == {"gate_activation": 1, "combine_experts": 2}
    assert len(grads) == (6 if trainable_biases else 4)  # hidden, routing weights, both stacks (+ both biases)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert ref_grad.abs().max() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grads[2][EXPERTS - 1].abs().max() == 0  # the expert no token chose
    indices, routing = routing_of(TOKENS, TOP_K, EXPERTS, seed=30)
    x_SH = rand(TOKENS, HIDDEN, seed=31, scale=2.0)[routing.token_S]
    pre = torch.cat([x_SH[routing.expert_S == e] @ experts.gate_up_proj[e] for e in range(EXPERTS)])
    assert (pre.abs() > LIMIT).any()  # the clamps are exercised


def test_a_custom_apply_gate_keeps_the_unfused_gate(monkeypatch: pytest.MonkeyPatch):
    experts = eager_experts(trainable_biases=False)
    fused_out, fused_grads = layer_output_and_grads(experts, fused_forward(experts))
    calls = count_calls(monkeypatch)
    out, grads = layer_output_and_grads(experts, fused_forward(experts, apply_gate=experts._apply_gate))
    assert calls == {"gate_activation": 0, "combine_experts": 2}
    torch.testing.assert_close(out, fused_out, rtol=1e-13, atol=1e-13)
    for grad, fused_grad in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(grad, fused_grad, rtol=1e-12, atol=1e-13)


def test_clamp_swiglu_gate_called_alone_is_clamp_swiglu():
    gate = ClampSwiGLUGate(alpha=ALPHA, limit=LIMIT)
    x = rand(5, 8, seed=40, scale=6.0)
    assert torch.equal(gate(x), clamp_swiglu(x, alpha=ALPHA, limit=LIMIT))
    assert torch.equal(gate(x), apply_gate(x))
