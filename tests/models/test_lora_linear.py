"""The fused LoRA ``Linear`` forward against PEFT's own forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from osstune.models.lora_linear import (
    FusedLoraLinearForward,
    disable_fused_lora_linear,
    enable_fused_lora_linear,
)


class TwoLinear(nn.Module):
    """Two projections, the second with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20, bias=False)
        self.down = nn.Linear(20, 12, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _peft_model(dtype: torch.dtype, **lora: object) -> nn.Module:
    torch.manual_seed(0)
    base = TwoLinear().to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; make the update matter
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return out.detach(), grads, x.grad.detach()


def test_float64_equals_peft_values_and_gradients() -> None:
    model = _peft_model(torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    reference = _run(model, x)
    assert enable_fused_lora_linear(model) == 2
    assert isinstance(model.base_model.model.up.__dict__["forward"], FusedLoraLinearForward)
    fused = _run(model, x)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-12, atol=1e-12)
    assert reference[1].keys() == fused[1].keys() and len(fused[1]) == 4
    for name in reference[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-12, atol=1e-12)
    # The update matters: without the adapter the output differs.
    with model.disable_adapter():
        assert (model(x) - fused[0]).abs().max() > 1e-2
    assert disable_fused_lora_linear(model) == 2
    torch.testing.assert_close(_run(model, x)[0], reference[0], rtol=0, atol=0)


def test_bfloat16_base_with_float32_adapter() -> None:
    model = _peft_model(torch.bfloat16)
    lora_a = model.base_model.model.up.lora_A["default"].weight
    assert lora_a.dtype == torch.float32  # PEFT keeps the adapter in float32
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    reference = _run(model, x)
    enable_fused_lora_linear(model)
    fused = _run(model, x)
    assert fused[0].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0].float(), reference[0].float(), rtol=3e-2, atol=3e-2)
    for name, grad in fused[1].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference[1][name], rtol=5e-2, atol=5e-2)


def test_dropout_draws_the_same_mask_as_peft() -> None:
    model = _peft_model(torch.float64, lora_dropout=0.5).train()
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.manual_seed(1)
    reference = _run(model, x)
    enable_fused_lora_linear(model)
    torch.manual_seed(1)
    fused = _run(model, x)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_bias": True}])
def test_variants_keep_peft_forward(lora: dict[str, bool]) -> None:
    model = _peft_model(torch.float64, **lora)
    x = torch.randn(2, 12, dtype=torch.float64)
    reference = _run(model, x)
    enable_fused_lora_linear(model)
    fused = _run(model, x)
    torch.testing.assert_close(fused[0], reference[0], rtol=0, atol=0)


def test_merged_adapter_uses_the_base() -> None:
    model = _peft_model(torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    expected = model(x).detach()
    enable_fused_lora_linear(model)
    model.merge_adapter()
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-12, atol=1e-12)
