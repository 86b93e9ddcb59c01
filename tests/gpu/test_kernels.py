"""The compiled Triton kernels on CUDA: clamp_swiglu against float64, MXFP4 dequantisation bit for bit."""

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
