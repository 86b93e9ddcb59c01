"""The fused linear cross-entropy against PyTorch's cross-entropy of the full logits in float64; the Triton row
kernel runs in Triton's interpreter."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from osstune.chat.options import IGNORE_INDEX
from osstune.kernels.cross_entropy import chunk_rows, linear_cross_entropy


def inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Hidden states and weight (both requiring grad) and targets with some ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::4] = IGNORE_INDEX
    return h, w, targets


def reference(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, divisor: float | None):
    """Loss and gradients of the full logits in float64."""
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    loss = F.cross_entropy(h64 @ w64.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss / (divisor if divisor is not None else (targets != IGNORE_INDEX).sum())
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("divisor", [None, 37.0])
@pytest.mark.parametrize("rows_per_chunk", [None, 8, 13])
def test_torch_path_equals_the_float64_reference(divisor: float | None, rows_per_chunk: int | None):
    h, w, targets = inputs(30, 16, 50, torch.float64)
    loss = linear_cross_entropy(h, w, targets, divisor=divisor, rows_per_chunk=rows_per_chunk, use_triton=False)
    (loss * 3.0).backward()  # the backward scales the gradients computed in the forward
    ref_loss, ref_h, ref_w = reference(h, w, targets, divisor)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)  # the loss is summed in float32
    torch.testing.assert_close(h.grad, 3.0 * ref_h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.grad, 3.0 * ref_w, rtol=1e-12, atol=1e-14)
    assert h.grad[::4].abs().max() == 0 and h.grad[1].abs().max() > 0  # ignored rows get no gradient


def test_frozen_weight_gets_no_gradient_and_leading_dims_flatten():
    h, w, targets = inputs(24, 16, 40, torch.float64, seed=1)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h.view(2, 12, 16), w, targets.view(2, 12), rows_per_chunk=5, use_triton=False)
    loss.backward()
    ref_loss, ref_h, _ = reference(h, w, targets, None)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, ref_h, rtol=1e-12, atol=1e-14)
    assert w.grad is None
    with pytest.raises(ValueError, match="23 targets for 24 hidden rows"):
        linear_cross_entropy(h, w, targets[:23], use_triton=False)


def test_chunks_hold_512_mib_of_logits():
    assert chunk_rows(201088, 2) == 1280  # gpt-oss in bf16
    assert chunk_rows(10**9, 2) == 128  # never fewer than 128 rows
    assert chunk_rows(512, 4) % 128 == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_kernel_matches_the_float64_reference(cross_entropy_kernels: ModuleType, dtype: torch.dtype,
                                                     tol: float, monkeypatch: pytest.MonkeyPatch):
    # A vocabulary of 3 column blocks, the last partial, and an all-ignored chunk (rows 0, 4, 8, ... with a chunk
    # of one row).
    monkeypatch.setattr(cross_entropy_kernels, "BLOCK_V", 32)
    h, w, targets = inputs(12, 16, 80, dtype, seed=2)
    loss = linear_cross_entropy(h, w, targets, rows_per_chunk=5, use_triton=True)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(h, w, targets, None)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=tol, atol=tol * ref_h.abs().max().item())
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=tol, atol=tol * ref_w.abs().max().item())
    h.grad = w.grad = None
    linear_cross_entropy(h, w, targets, rows_per_chunk=1, use_triton=True).backward()
    assert h.grad[::4].abs().max() == 0
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=tol, atol=tol * ref_h.abs().max().item())
