"""``HostAdamW`` (``--offload_optimizer``): the same updates as ``torch.optim.AdamW`` in float64, step by step, with
the moments in host RAM, across buckets, parameter groups, missing gradients, learning-rate changes and a state
round trip in both directions."""

from __future__ import annotations

import pytest
import torch

from osstune.train.host_optimizer import HostAdamW

SHAPES = [(7, 5), (300,), (3, 3, 3), (1,), (40, 2)]


def make_params(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two identical float64 parameter lists."""
    generator = torch.Generator().manual_seed(seed)
    first = [torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_() for shape in SHAPES]
    return first, [param.detach().clone().requires_grad_() for param in first]


def groups(params: list[torch.Tensor]) -> list[dict]:
    """Weight decay on the first three, none on the rest (as the Trainer groups them)."""
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def run_steps(host: HostAdamW, reference: torch.optim.Optimizer, ours: list[torch.Tensor],
              theirs: list[torch.Tensor], steps: int, seed: int) -> None:
    """Give both the same gradients (one parameter skipped on step 2) and learning rates, and step both."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for index, (mine, other) in enumerate(zip(ours, theirs)):
            grad = torch.randn(mine.shape, dtype=torch.float64, generator=generator)
            skip = step == 2 and index == 1
            mine.grad = None if skip else grad.clone()
            other.grad = None if skip else grad.clone()
        for optimizer in (host, reference):
            optimizer.param_groups[0]["lr"] = 1e-2 / (step + 1)
        host.step()
        reference.step()


def test_matches_torch_adamw_exactly_across_buckets() -> None:
    ours, theirs = make_params()
    host = HostAdamW(groups(ours), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, bucket_bytes=1_000)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    assert len(list(host._buckets(ours))) == 4  # (7,5) | (300,) | (3,3,3)+(1,)... split by the byte bound
    run_steps(host, reference, ours, theirs, steps=5, seed=1)
    for mine, other, start in zip(ours, theirs, make_params()[0]):
        assert torch.equal(mine, other)
        assert (mine - start).abs().min() > 1e-6  # every element moved
    for mine, other in zip(ours, theirs):
        for name in ("exp_avg", "exp_avg_sq"):
            assert host.state[mine][name].device.type == "cpu"
            # The fused kernel orders the moment update's float operations its own way: an ulp apart at most.
            torch.testing.assert_close(host.state[mine][name], reference.state[other][name], rtol=1e-15, atol=0)
        assert float(host.state[mine]["step"]) == float(reference.state[other]["step"])
    assert float(host.state[ours[1]]["step"]) == 4.0  # skipped once


def test_state_round_trips_with_torch_adamw() -> None:
    ours, theirs = make_params()
    host = HostAdamW(groups(ours), lr=1e-2)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2)
    run_steps(host, reference, ours, theirs, steps=3, seed=2)
    # Swap the states: each optimizer continues from the other's state.
    resumed_host = HostAdamW(groups(ours), lr=1e-2)
    resumed_host.load_state_dict(reference.state_dict())
    resumed_reference = torch.optim.AdamW(groups(theirs), lr=1e-2)
    resumed_reference.load_state_dict(host.state_dict())
    for state in resumed_host.state.values():
        assert state["exp_avg"].device.type == "cpu" and state["step"].dtype == torch.float32
    run_steps(resumed_host, resumed_reference, ours, theirs, steps=3, seed=3)
    for mine, other in zip(ours, theirs):
        # The reference steps with the foreach kernel here and the fused one before: an ulp apart at most.
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1e-8}, {"weight_decay": -0.1}])
def test_invalid_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="HostAdamW: invalid hyperparameters"):
        HostAdamW([torch.zeros(2, requires_grad=True)], **kwargs)
