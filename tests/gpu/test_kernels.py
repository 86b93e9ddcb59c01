"""The compiled Triton kernels on CUDA: clamp_swiglu and the fused expert passes against float64, MXFP4 dequantisation
bit for bit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.kernels.swiglu import clamp_swiglu
from osstune.models.gpt_oss.mxfp4 import E2M1_VALUES, dequantize_mxfp4
from osstune.models.gpt_oss.mxfp4_experts import Mxfp4Stack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ALPHA, LIMIT = 1.702, 7.0
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# clamp_swiglu tolerances against float64 (relative, plus an absolute floor for values near zero): float32 math
# inside, one rounding to the storage dtype (half an ulp: 2**-9 bfloat16, 2**-11 float16), and the GPU's
# approximate exp (a few float32 ulps).
SWIGLU_TOLERANCES = {torch.bfloat16: (2**-8, 1e-5), torch.float16: (2**-10, 1e-5), torch.float32: (1e-5, 1e-6)}


def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' activation with gpt-oss's constants."""
    return GptOssExperts._apply_gate(SimpleNamespace(alpha=ALPHA, limit=LIMIT), gate_up)


def forward_backward(fn, gate_up: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x)`` and the gradient of ``x`` for the upstream gradient ``grad_out``."""
    x = gate_up.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad


def gate_up_values(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Random gate/up values on CUDA spanning the clamps, with the limits and large negatives in row 0."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows), dtype=torch.float64) * 5
    edges = [LIMIT, LIMIT, 7.5, -LIMIT, -7.5, -7.5, 100.0, -100.0, -6e4, 3.0, -2.0, 6.99]
    count = min(len(edges), width)
    x[0, :count] = torch.tensor(edges[:count], dtype=torch.float64)
    return x.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "width"), [(4099, 5760), (257, 200), (1, 2)])
def test_clamp_swiglu_kernels_match_float64(dtype: torch.dtype, rows: int, width: int):
    x = gate_up_values(rows, width, dtype)
    grad_out = torch.randn(rows, width // 2, device="cuda").to(dtype)
    out, grad = forward_backward(lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT), x, grad_out)
    ref_out, ref_grad = forward_backward(apply_gate, x.double(), grad_out.double())
    rtol, atol = SWIGLU_TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    # On CUDA the default is the Triton path, which is deterministic.
    forced_out, forced_grad = forward_backward(
        lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT, use_triton=True), x, grad_out
    )
    assert torch.equal(out, forced_out) and torch.equal(grad, forced_grad)


def test_clamp_swiglu_bf16_is_closer_to_float64_than_apply_gate_in_bf16():
    # One rounding at the end instead of one per operation.
    x = gate_up_values(2048, 5760, torch.bfloat16)
    grad_out = torch.randn(2048, 2880, device="cuda").to(torch.bfloat16)
    ref_out, ref_grad = forward_backward(apply_gate, x.double(), grad_out.double())
    out, grad = forward_backward(lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT), x, grad_out)
    bf16_out, bf16_grad = forward_backward(apply_gate, x, grad_out)
    assert (out.double() - ref_out).norm() < (bf16_out.double() - ref_out).norm()
    assert (grad.double() - ref_grad).norm() < (bf16_grad.double() - ref_grad).norm()


def every_byte_and_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """One expert of 256 rows (row r has scale byte r) whose 16 blocks hold the code bytes 0..255, on CUDA."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 256, 16, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).expand(1, 256, 16).contiguous()
    return blocks.cuda(), scales.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_kernel_is_bit_identical_for_every_byte_and_scale(dtype: torch.dtype):
    from osstune.kernels.mxfp4 import dequantize_mxfp4_triton

    blocks, scales = every_byte_and_scale()
    out = dequantize_mxfp4_triton(blocks, scales, dtype)
    exact = torch.tensor(
        [[math.ldexp(E2M1_VALUES[(byte >> 4 * (col % 2)) & 15], scale - 127)
          for scale in range(256)] for byte in range(256) for col in (0, 1)],
        dtype=torch.float64,
    )  # fmt: skip  # [column, row = scale]: the exact product, rounded to float32 and then to dtype
    assert torch.equal(out[0].cpu().view(BITS[dtype]), exact.to(torch.float32).to(dtype).view(BITS[dtype]))
    expected = dequantize_mxfp4(blocks, scales, dtype)
    # The reference uses torch.ldexp; builds whose ldexp multiplies by pow(2, e) turn scale 255 (2**128 = inf
    # in float32) into inf * 0.5 = inf and inf * 0 = NaN, unlike an exact ldexp. Every other scale agrees.
    probe = torch.ldexp(torch.tensor([0.5], device="cuda"), torch.tensor([128], dtype=torch.int32, device="cuda"))
    rows = 256 if torch.isfinite(probe).item() else 255
    assert torch.equal(out[..., :rows].view(BITS[dtype]), expected[..., :rows].view(BITS[dtype]))


def test_mxfp4_stack_dequantizes_with_the_kernel_on_cuda(monkeypatch: pytest.MonkeyPatch):
    import osstune.kernels.mxfp4 as kernels

    calls = []
    kernel = kernels.dequantize_mxfp4_triton
    monkeypatch.setattr(kernels, "dequantize_mxfp4_triton", lambda *args: calls.append(args) or kernel(*args))
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (5, 576, 9, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(110, 135, (5, 576, 9), generator=generator, dtype=torch.uint8)
    stack = Mxfp4Stack(blocks.cuda(), scales.cuda(), torch.bfloat16)
    for experts in (slice(None), slice(2, 4)):
        dense = stack.dequantize(experts)
        expected = dequantize_mxfp4(blocks[experts], scales[experts], torch.bfloat16)
        assert torch.equal(dense.cpu().view(torch.int16), expected.view(torch.int16))
    assert len(calls) == 2


@pytest.mark.parametrize("bound", [8, 16])
def test_bounded_dequantisation_slices_match_the_whole_stack_on_cuda(bound: int):
    # gpt-oss-20b's gate_up stack, 8 (16) experts' worth at a time: 4 (2) row slices forward, as many group slices
    # backward.
    from osstune.models.gpt_oss.experts import route_by_expert

    generator = torch.Generator(device="cuda").manual_seed(0)
    blocks = torch.randint(0, 256, (32, 5760, 90, 16), generator=generator, dtype=torch.uint8, device="cuda")
    scales = torch.randint(118, 122, (32, 5760, 90), generator=generator, dtype=torch.uint8, device="cuda")
    whole = Mxfp4Stack(blocks, scales, torch.bfloat16)
    bounded = Mxfp4Stack(blocks, scales, torch.bfloat16, max_dense_experts=bound)
    indices = torch.randint(0, 32, (2048, 4), generator=generator, device="cuda")
    routing = route_by_expert(indices, 32)
    x = torch.randn(8192, 2880, generator=generator, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(8192, 5760, generator=generator, device="cuda", dtype=torch.bfloat16)
    for rows, transpose in ((x, False), (grad, True)):
        expected = whole.multiply(rows, routing.ends_E, grouped=True, transpose=transpose).float()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        got = bounded.multiply(rows, routing.ends_E, grouped=True, transpose=transpose)
        torch.cuda.synchronize()
        # Beyond the result and one slice's products, only one slice of dense weights.
        scratch = torch.cuda.max_memory_allocated() - start - int(got.numel() * 2 * (1.26 if bound == 8 else 1.51))
        share = 0.26 if bound == 8 else 0.51
        assert scratch <= share * 32 * 5760 * 2880 * 2 + 2**20  # that share of the layer's dense stack
        assert not got.isnan().any()
        # Each product still sums over the whole inner dimension in float32: only the GEMM's tiling may differ.
        assert ((got.float() - expected).abs() / expected.abs().clamp_min(1.0)).max() < 2**-7


def test_timing_against_the_torch_paths():
    # Printed for information (pytest -s), not asserted.
    from triton.testing import do_bench

    from osstune.kernels.mxfp4 import dequantize_mxfp4_triton

    x = torch.randn(8192, 5760, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(8192, 2880, device="cuda", dtype=torch.bfloat16)
    for name, fn in (
        ("_apply_gate autograd", apply_gate),
        ("clamp_swiglu torch path", lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT, use_triton=False)),
        ("clamp_swiglu triton", lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT)),
    ):
        ms = do_bench(lambda fn=fn: fn(x).backward(grad_out), grad_to_none=[x], rep=50)
        print(f"swiglu fwd+bwd 8192 x 5760 bf16, {name}: {ms:.3f} ms")
    blocks = torch.randint(0, 256, (32, 2880, 90, 16), device="cuda", dtype=torch.uint8)
    scales = torch.randint(110, 135, (32, 2880, 90), device="cuda", dtype=torch.uint8)
    for name, fn in (("dequantize_mxfp4", dequantize_mxfp4), ("dequantize_mxfp4_triton", dequantize_mxfp4_triton)):
        ms = do_bench(lambda fn=fn: fn(blocks, scales, torch.bfloat16), rep=50)
        print(f"dequantize 32 x 2880 x 2880 to bf16, {name}: {ms:.3f} ms")


# Fused expert passes (osstune.kernels.moe) against float64. gate_activation: the pre-activation is one float32 sum
# rounded once to the storage dtype; the activation comes from the float32 sum (whose own rounding, ~20 * 2**-24 for
# these magnitudes times the activation's slope of up to ~9, sets an absolute floor of 2e-5) and is rounded once;
# the backward differentiates at the stored pre-activation, so its reference is taken there (SwiGLU tolerances).
# combine_experts: sums and products in float32, rounded once; the routing weights' gradient is a float32 dot
# product over H = 2880 terms of magnitude ~1, hence an absolute floor of 1e-3 on top of one rounding.
GATE_PRE_TOLERANCES = {torch.bfloat16: (2**-8, 1e-5), torch.float16: (2**-10, 1e-5), torch.float32: (1e-6, 1e-5)}
GATE_ACT_TOLERANCES = {torch.bfloat16: (2**-8, 2e-5), torch.float16: (2**-10, 2e-5), torch.float32: (1e-5, 2e-5)}
COMBINE_TOLERANCES = {torch.bfloat16: (2**-8, 1e-3), torch.float16: (2**-10, 1e-3), torch.float32: (1e-5, 1e-3)}


def gate_inputs_cuda(
    rows: int, width: int, dtype: torch.dtype, experts: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """base (past the clamps), lora, bias and sorted experts on CUDA, seeded."""
    generator = torch.Generator().manual_seed(rows + width)
    base = gate_up_values(rows, width, dtype)
    lora = torch.randn(rows, width, generator=generator).to(dtype).cuda()
    bias = torch.randn(experts, width, generator=generator).to(dtype).cuda()
    expert = torch.randint(0, experts, (rows,), generator=generator).sort().values.cuda()
    return base, lora, bias, expert


def gate_forward_backward(
    base: torch.Tensor, lora: torch.Tensor, bias: torch.Tensor, expert: torch.Tensor, grad_out: torch.Tensor,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_activation's activation, the stored pre-activation, and the gradients of base and lora."""
    from osstune.kernels.moe import gate_activation

    base_leaf = base.detach().clone().requires_grad_(True)
    lora_leaf = lora.detach().clone().requires_grad_(True)
    base_SF = base_leaf.clone()
    act = gate_activation(base_SF, lora_leaf, bias, expert, alpha=ALPHA, limit=LIMIT, use_triton=use_triton)
    act.backward(grad_out)
    return act.detach(), base_SF.detach(), base_leaf.grad, lora_leaf.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "width"), [(4099, 5760), (257, 200), (1, 2)])
def test_gate_activation_kernel_matches_float64(dtype: torch.dtype, rows: int, width: int):
    base, lora, bias, expert = gate_inputs_cuda(rows, width, dtype)
    grad_out = torch.randn(rows, width // 2, device="cuda").to(dtype)
    act, stored, grad_base, grad_lora = gate_forward_backward(base, lora, bias, expert, grad_out)
    from osstune.kernels.swiglu import clamp_swiglu_values

    pre = base.double() + bias.double()[expert] + lora.double()
    ref_act, ref_grad = forward_backward(apply_gate, stored.double(), grad_out.double())  # at the stored point
    rtol, atol = GATE_PRE_TOLERANCES[dtype]
    torch.testing.assert_close(stored.double(), pre, rtol=rtol, atol=atol)
    rtol, atol = GATE_ACT_TOLERANCES[dtype]
    torch.testing.assert_close(act.double(), ref_act, rtol=rtol, atol=atol)
    assert torch.equal(act, clamp_swiglu_values(stored, alpha=ALPHA, limit=LIMIT))  # rebuilt bit for bit
    rtol, atol = SWIGLU_TOLERANCES[dtype]
    torch.testing.assert_close(grad_base.double(), ref_grad, rtol=rtol, atol=atol)
    assert torch.equal(grad_lora, grad_base)
    forced = gate_forward_backward(base, lora, bias, expert, grad_out, use_triton=True)
    assert all(torch.equal(a, b) for a, b in zip(forced, (act, stored, grad_base, grad_lora), strict=True))


def test_gate_activation_bf16_is_closer_to_float64_than_the_unfused_adds():
    # The unfused path rounds base + bias and then + lora to bf16 before the activation; the fused one rounds once.
    base, lora, bias, expert = gate_inputs_cuda(2048, 5760, torch.bfloat16)
    grad_out = torch.randn(2048, 2880, device="cuda").to(torch.bfloat16)
    exact = apply_gate(base.double() + bias.double()[expert] + lora.double())
    act, *_ = gate_forward_backward(base, lora, bias, expert, grad_out)
    unfused = clamp_swiglu(base.clone().add_(bias[expert]).add_(lora), alpha=ALPHA, limit=LIMIT)
    assert (act.double() - exact).norm() < (unfused.double() - exact).norm()


def combine_inputs_cuda(
    tokens: int, top_k: int, hidden: int, dtype: torch.dtype, experts: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, bias, sorted experts, pairs, softmax weights and upstream gradient on CUDA (K distinct experts each)."""
    from osstune.models.gpt_oss.experts import route_by_expert

    generator = torch.Generator().manual_seed(tokens * top_k + hidden)
    indices = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    routing = route_by_expert(indices.cuda(), experts)
    down = torch.randn(tokens * top_k, hidden, generator=generator).to(dtype).cuda()
    bias = torch.randn(experts, hidden, generator=generator).to(dtype).cuda()
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(dtype).cuda()
    grad_out = torch.randn(tokens, hidden, generator=generator).to(dtype).cuda()
    return down, bias, routing.expert_S, routing.pair_S, weights, grad_out


def combine_forward_backward(
    down: torch.Tensor, bias: torch.Tensor, expert_S: torch.Tensor, pair_S: torch.Tensor, weights: torch.Tensor,
    grad_out: torch.Tensor, fused: bool = True, use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums and the gradients of rows and weights: combine_experts, or the unfused formula (in the inputs' dtype)."""
    from osstune.kernels.moe import combine_experts

    down = down.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    tokens, top_k = weights.shape
    if fused:
        out = combine_experts(down, bias, expert_S, pair_S, weights, tokens, top_k, use_triton)
    else:
        weighted = (down + bias[expert_S]) * weights.reshape(-1)[pair_S][:, None]
        pairs = torch.zeros_like(weighted).index_copy(0, pair_S, weighted)
        out = pairs.view(tokens, top_k, down.shape[1]).sum(dim=1)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), down.grad, weights.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(2051, 4, 2880), (33, 2, 130), (1, 1, 8)])
def test_combine_experts_kernels_match_float64(dtype: torch.dtype, tokens: int, top_k: int, hidden: int):
    inputs = combine_inputs_cuda(tokens, top_k, hidden, dtype)
    out, grad_down, grad_weights = combine_forward_backward(*inputs)
    down, bias, expert_S, pair_S, weights, grad_out = inputs
    ref_out, ref_down, ref_weights = combine_forward_backward(
        down.double(), bias.double(), expert_S, pair_S, weights.double(), grad_out.double(), fused=False
    )
    assert out.dtype == grad_down.dtype == grad_weights.dtype == dtype
    rtol, atol = COMBINE_TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_down.double(), ref_down, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_weights.double(), ref_weights, rtol=rtol, atol=atol)
    # The default on CUDA is the Triton path; it uses no atomics, so it is deterministic.
    forced = combine_forward_backward(*inputs, use_triton=True)
    assert all(torch.equal(a, b) for a, b in zip(forced, (out, grad_down, grad_weights), strict=True))


def test_fused_experts_forward_bf16_matches_float64():
    # The whole layer on the grouped kernel in bf16 (fused gate and combine) against the CPU loop in float64.
    from osstune.models.gpt_oss.experts import ClampSwiGLUGate, LoraFactors, experts_forward, grouped_mm_applies

    tokens, hidden, intermediate, experts, top_k, rank = 300, 128, 192, 8, 4, 8
    generator = torch.Generator().manual_seed(7)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    indices = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    tensors = {
        "hidden": rand(tokens, hidden, scale=1.0), "weights": torch.softmax(rand(tokens, top_k, scale=1.0), -1),
        "gate_up": rand(experts, hidden, 2 * intermediate, scale=0.3),
        "gate_up_bias": rand(experts, 2 * intermediate, scale=0.5),
        "down": rand(experts, intermediate, hidden, scale=0.1), "down_bias": rand(experts, hidden, scale=0.5),
        "a1": rand(experts, hidden, rank, scale=0.1), "b1": rand(experts, rank, 2 * intermediate, scale=0.1),
        "a2": rand(experts, intermediate, rank, scale=0.1), "b2": rand(experts, rank, hidden, scale=0.1),
    }  # fmt: skip

    def run(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
        t = {name: value.to(device, dtype, copy=True) for name, value in tensors.items()}
        trained = [t[name].requires_grad_(True) for name in ("hidden", "weights", "a1", "b1", "a2", "b2")]
        out = experts_forward(
            t["hidden"], indices.to(device), t["weights"], gate_up_EHF=t["gate_up"], gate_up_bias_EF=t["gate_up_bias"],
            down_EIH=t["down"], down_bias_EH=t["down_bias"], apply_gate=ClampSwiGLUGate(alpha=ALPHA, limit=LIMIT),
            gate_up_loras=[LoraFactors(t["a1"], t["b1"], 2.0)], down_loras=[LoraFactors(t["a2"], t["b2"], 2.0)],
        )  # fmt: skip
        probe = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64).view_as(out).to(device, dtype)
        grads = torch.autograd.grad((out * probe).sum(), trained)
        return [tensor.detach().double().cpu() for tensor in (out, *grads)]

    bf16 = {name: tensors[name].to(torch.bfloat16).cuda() for name in ("hidden", "gate_up")}
    assert grouped_mm_applies(bf16["hidden"], bf16["gate_up"])
    fused, reference = run(torch.bfloat16, "cuda"), run(torch.float64, "cpu")
    # bf16 roundings between the matmuls: measured ~0.5% on the output and ~3% on the gradients that flow back
    # through the activation (hidden, a1, b1, a2), for the fused and the unfused path alike.
    for index, (ours, ref) in enumerate(zip(fused, reference, strict=True)):
        assert ref.norm() > 0
        assert (ours - ref).norm() / ref.norm() < (1e-2 if index == 0 else 5e-2)


def test_timing_of_the_fused_expert_passes():
    # Printed for information (pytest -s), not asserted; bench/kernels.py has the full comparison.
    from triton.testing import do_bench

    from osstune.kernels.moe import combine_experts, gate_activation

    base = torch.randn(32768, 5760, device="cuda", dtype=torch.bfloat16).mul_(4)
    lora = torch.randn(32768, 5760, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(32, 5760, device="cuda", dtype=torch.bfloat16)
    expert = torch.randint(0, 32, (32768,), device="cuda").sort().values
    grad_act = torch.randn(32768, 2880, device="cuda", dtype=torch.bfloat16)

    def gate() -> None:
        gate_activation(base.clone(), lora, bias, expert, alpha=ALPHA, limit=LIMIT).backward(grad_act)

    ms = do_bench(gate, grad_to_none=[lora], rep=50)
    print(f"gate_activation fwd+bwd 32768 x 5760 bf16 (with a copy of base): {ms:.3f} ms")
    down, bias, expert_S, pair_S, weights, grad_out = combine_inputs_cuda(8192, 4, 2880, torch.bfloat16)
    down.requires_grad_(True)
    weights.requires_grad_(True)
    ms = do_bench(lambda: combine_experts(down, bias, expert_S, pair_S, weights, 8192, 4).backward(grad_out),
                  grad_to_none=[down, weights], rep=50)  # fmt: skip
    print(f"combine_experts fwd+bwd T=8192 K=4 H=2880 bf16: {ms:.3f} ms")


def test_linear_cross_entropy_bf16_matches_float64_without_host_syncs():
    # Several chunks (the last partial), ignored rows, a vocabulary of 13 kernel column blocks (the last partial).
    import torch.nn.functional as F

    from osstune.kernels.cross_entropy import linear_cross_entropy

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(3000, 256, generator=generator).to(torch.bfloat16).cuda().requires_grad_(True)
    weight = (torch.randn(50000, 256, generator=generator) * 0.05).to(torch.bfloat16).cuda()
    targets = torch.randint(0, 50000, (3000,), generator=generator)
    targets[::5] = -100
    targets = targets.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk=1024)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    logits = (hidden.detach() @ weight.T).double()  # the bf16 logits the kernel reads, exactly
    logits.requires_grad_(True)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    ref.backward()
    ref_grad_hidden = logits.grad @ weight.double()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert hidden.grad[::5].abs().max() == 0
    error = (hidden.grad.double() - ref_grad_hidden).norm() / ref_grad_hidden.norm()
    assert error < 1e-2, error  # the logits' gradient is stored in bf16 before its GEMM, as in liger's kernel
