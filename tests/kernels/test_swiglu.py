"""clamp_swiglu: transformers' ``_apply_gate`` with autograd in float64 is the reference, for both implementations."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.kernels import swiglu
from osstune.kernels.swiglu import clamp_swiglu

ALPHA, LIMIT = 1.702, 7.0
INTERPRETER_EXP_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy


def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' activation, unchanged, with gpt-oss's constants."""
    return GptOssExperts._apply_gate(SimpleNamespace(alpha=ALPHA, limit=LIMIT), gate_up)


def reference(gate_up: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_apply_gate`` and its autograd input gradient, in float64, from the given (possibly rounded) inputs."""
    x = gate_up.detach().double().requires_grad_(True)
    out = apply_gate(x)
    out.backward(grad_out.double())
    assert x.grad is not None
    return out.detach(), x.grad


def ours(gate_up: torch.Tensor, grad_out: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp_swiglu`` and its input gradient, in the dtype of ``gate_up``."""
    x = gate_up.detach().clone().requires_grad_(True)
    out = clamp_swiglu(x, alpha=ALPHA, limit=LIMIT, use_triton=use_triton)
    out.backward(grad_out)
    assert x.grad is not None
    return out.detach(), x.grad


def gate_up_values(rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random ``[rows, width]`` gate/up values spanning the clamps, plus the edge values in the first rows.

    Row 0 pairs (gate, up): at the limits exactly, just inside and outside them, far beyond, large negatives.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator, dtype=torch.float64) * 5
    edges = [LIMIT, LIMIT, LIMIT, -LIMIT, 7.5, 7.5, -7.5, -7.5, 100.0, -100.0, -40.0, 0.0,
             -1e4, 3.0, -6e4, -2.0, 6.99, 6.99, 0.0, -6.99, -0.75, 1e-3]  # fmt: skip
    if rows:
        count = min(len(edges), width)
        x[0, :count] = torch.tensor(edges[:count], dtype=torch.float64)
    return x.to(dtype)


def test_clamp_gradient_convention_of_torch_includes_the_bounds():
    # The rule both implementations follow, checked on torch itself: min <= x <= max passes the gradient.
    x = torch.tensor([6.0, 7.0, 7.5, -7.0, -7.5], dtype=torch.float64, requires_grad=True)
    x.clamp(min=-7.0, max=7.0).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_torch_path_equals_apply_gate_in_float64():
    x = gate_up_values(9, 46, torch.float64)
    grad_out = torch.randn(9, 23, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grad = ours(x, grad_out, use_triton=False)
    ref_out, ref_grad = reference(x, grad_out)
    assert torch.equal(out, ref_out)  # the same operations in the same order
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=1e-14)


def test_gradient_at_and_beyond_the_limits():
    # (gate, up) pairs: gate exactly at the limit passes its gradient, above it does not; up likewise at +-limit.
    x = torch.tensor([[LIMIT, LIMIT, 7.5, 7.5, 2.0, -LIMIT, 2.0, -7.5, -6e4, 1.0]], dtype=torch.float64)
    grad_out = torch.ones(1, 5, dtype=torch.float64)
    _, grad = ours(x, grad_out, use_triton=False)
    _, ref_grad = reference(x, grad_out)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=0)
    sig7 = 1 / (1 + torch.exp(torch.tensor(-ALPHA * LIMIT, dtype=torch.float64)))
    d_gate7 = (LIMIT + 1) * (sig7 + LIMIT * sig7 * (1 - sig7) * ALPHA)  # d out / d gate at gate = up = 7
    assert grad[0, 0].item() == pytest.approx(d_gate7.item(), rel=1e-14)
    assert grad[0, 1].item() == pytest.approx((LIMIT * sig7).item(), rel=1e-14)
    assert grad[0, 2].item() == 0.0 and grad[0, 3].item() == 0.0  # both clamps active
    assert grad[0, 5].item() != 0.0 and grad[0, 7].item() == 0.0  # up = -7 passes, up = -7.5 does not
    assert grad[0, 8].item() == 0.0 and grad[0, 9].item() == 0.0  # gate -6e4: sigmoid underflows to 0


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-8), (torch.float16, 2**-10)])
def test_torch_path_is_accurate_to_the_storage_dtype(dtype: torch.dtype, tol: float):
    # float32 math inside, one rounding to the storage dtype at the end (half an ulp: 2**-9 bf16, 2**-11 fp16).
    x = gate_up_values(16, 64, dtype)
    grad_out = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, grad = ours(x, grad_out, use_triton=False)
    ref_out, ref_grad = reference(x, grad_out)
    assert out.dtype == grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=1e-6)


def test_saves_only_the_input_for_backward():
    x = gate_up_values(8, 32, torch.float32).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        clamp_swiglu(x, alpha=ALPHA, limit=LIMIT)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape  # x itself
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        apply_gate(x)
    assert len(saved) > 4  # the reference keeps its intermediates


def test_leading_dimensions_and_no_grad_input():
    x = gate_up_values(6, 10, torch.float64)
    out = clamp_swiglu(x.reshape(2, 3, 10), alpha=ALPHA, limit=LIMIT)
    assert out.shape == (2, 3, 5)
    assert torch.equal(out.reshape(6, 5), apply_gate(x))
    assert not out.requires_grad


def test_cpu_tensors_use_the_torch_path_by_default(monkeypatch: pytest.MonkeyPatch):
    def no_triton() -> ModuleType:
        raise AssertionError("the Triton kernels were used for a CPU tensor")

    monkeypatch.setattr(swiglu, "_triton_kernels", no_triton)
    x = gate_up_values(4, 8, torch.float32).requires_grad_(True)
    clamp_swiglu(x, alpha=ALPHA, limit=LIMIT).sum().backward()
    assert x.grad is not None


def test_rejects_odd_widths_and_unsupported_kernel_dtypes():
    with pytest.raises(ValueError, match="must be even"):
        clamp_swiglu(torch.zeros(2, 5), alpha=ALPHA, limit=LIMIT)
    with pytest.raises(ValueError, match="Triton SwiGLU kernels take"):
        clamp_swiglu(torch.zeros(2, 4, dtype=torch.float64), alpha=ALPHA, limit=LIMIT, use_triton=True)


@INTERPRETER_EXP_OVERFLOW
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2**-10)])
@pytest.mark.parametrize(("rows", "width"), [(37, 200), (1, 2), (33, 130), (0, 12)])
def test_triton_kernels_match_float64_reference(
    swiglu_kernels: ModuleType, dtype: torch.dtype, tol: float, rows: int, width: int
):
    # In Triton's interpreter (bfloat16 is not reliable there; tests/gpu covers it). The shapes leave partial
    # row and column tiles (the tile is 32 rows x 64 pairs) and include a single pair and no rows at all.
    assert swiglu_kernels.BLOCK_ROWS == 32 and swiglu_kernels.BLOCK_OUT_COLS == 64
    x = gate_up_values(rows, width, dtype, seed=rows)
    grad_out = torch.randn(rows, width // 2, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, grad = ours(x, grad_out, use_triton=True)
    ref_out, ref_grad = reference(x, grad_out)
    assert out.shape == (rows, width // 2) and grad.shape == (rows, width)
    assert out.dtype == grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=1e-6)


@INTERPRETER_EXP_OVERFLOW
def test_triton_path_saves_only_the_input(swiglu_kernels: ModuleType):
    x = gate_up_values(8, 32, torch.float32).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = clamp_swiglu(x, alpha=ALPHA, limit=LIMIT, use_triton=True)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape  # x itself
    torch.testing.assert_close(out, clamp_swiglu(x, alpha=ALPHA, limit=LIMIT, use_triton=False), rtol=1e-6, atol=1e-6)
