"""``HostAdamW`` on CUDA: the parameters follow ``torch.optim.AdamW(fused=True)`` bit for bit while the moments
stay in pinned host RAM and the device holds only the streamed buckets."""

from __future__ import annotations

import pytest
import torch

from osstune.train.host_optimizer import HostAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = [(2880, 8), (8, 4096), (32, 8, 5760), (32, 2880, 8), (7,), (512, 8)]
BUCKET = 2 * 2**20


def test_streams_the_moments_and_matches_fused_adamw() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    ours = [torch.randn(shape, device=device, generator=generator).requires_grad_() for shape in SHAPES]
    theirs = [param.detach().clone().requires_grad_() for param in ours]
    host = HostAdamW([{"params": ours[:4], "weight_decay": 0.1}, {"params": ours[4:], "weight_decay": 0.0}],
                     lr=1e-3, bucket_bytes=BUCKET)
    reference = torch.optim.AdamW([{"params": theirs[:4], "weight_decay": 0.1},
                                   {"params": theirs[4:], "weight_decay": 0.0}], lr=1e-3, fused=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for step in range(6):  # a parameter larger than the bucket makes the buffers grow on the first step
        for mine, other in zip(ours, theirs):
            grad = torch.randn(mine.shape, device=device, generator=generator)
            mine.grad, other.grad = grad.clone(), grad
        host.step()
        reference.step()
        if step == 0:
            torch.cuda.synchronize()
            # Two buckets of moments (a parameter larger than a bucket gets buffers of its size) and one step
            # counter per parameter; the reference holds every moment and its own step counters.
            largest = max(2 * p.numel() * 4 for p in ours)
            grads = sum(p.grad.numel() * 4 for p in ours + theirs)
            held = torch.cuda.memory_allocated() - before - grads - sum(p.numel() * 4 for p in theirs) * 2
            assert held <= 2 * max(BUCKET, largest) + 4 * 2**20  # + the allocator's 2 MiB rounding, step counters
    torch.cuda.synchronize()
    for mine, other in zip(ours, theirs):
        assert torch.equal(mine, other)
        state = host.state[mine]
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].is_pinned()
        torch.testing.assert_close(state["exp_avg_sq"], reference.state[other]["exp_avg_sq"].cpu(), rtol=0, atol=0)
    saved = host.state_dict()
    assert saved["state"][0]["exp_avg"].is_pinned()
