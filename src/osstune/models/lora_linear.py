"""A leaner forward for PEFT's LoRA ``Linear`` layers: the update runs in the input's dtype and is fused into one GEMM.

PEFT keeps adapter weights in float32 next to a bf16 base and computes ``result + lora_B(lora_A(x.float())) *
scaling``: the input is copied to float32, both products run in float32, and the sum is a float32 tensor of the
full output width that is cast back to bf16, for every projection, in the forward, the recompute and the backward.
``FusedLoraLinearForward`` computes the same function as

    out = base(x);  out += scaling * (dropout(x) @ A^T) @ B^T    (one ``addmm``, in x's dtype)

with ``A`` and ``B`` cast to ``x``'s dtype (a copy of r * (in + out) elements; the float32 parameters still get
float32 gradients through the cast). Parameters, names and the saved adapter stay PEFT's; layers with a LoRA
variant (DoRA, ...), a LoRA bias, merged or disabled adapters, or a mixed-adapter batch keep PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class FusedLoraLinearForward:
    """Forward of a PEFT LoRA ``Linear`` with the update in the input's dtype, added inside a GEMM.

    Installed by ``enable_fused_lora_linear`` as the module's ``forward``.

    Args:
        module: the PEFT LoRA ``Linear`` layer.
    """

    def __init__(self, module: LoraLinear) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the layer.

        Args:
            x: the input, [..., in].
            *args: passed to PEFT's forward when it is used.
            **kwargs: likewise.

        Returns:
            The output, [..., out], in the base layer's output dtype.
        """
        module = self.module
        adapters = [name for name in module.active_adapters if name in module.lora_A]
        if args or kwargs or module.disable_adapters or module.merged or not _plain(module, adapters):
            return type(module).forward(module, x, *args, **kwargs)
        out = module.base_layer(x)
        flat = out.reshape(-1, out.shape[-1])
        for name in adapters:
            inputs = module.lora_dropout[name](x)
            weight_a = module.lora_A[name].weight.to(inputs.dtype)
            weight_b = module.lora_B[name].weight.to(inputs.dtype)
            mid = torch.nn.functional.linear(inputs, weight_a).reshape(-1, weight_a.shape[0])
            flat = torch.addmm(flat, mid, weight_b.T, alpha=module.scaling[name])
        return flat.view(out.shape)


def _plain(module: LoraLinear, adapters: list[str]) -> bool:
    """Whether every active adapter of ``module`` is vanilla LoRA (no variant, no bias) on a plain linear base.

    Args:
        module: the PEFT LoRA ``Linear`` layer.
        adapters: its active adapters that it holds.
    """
    return isinstance(module.base_layer, nn.Linear) and all(
        name not in module.lora_variant and module.lora_B[name].bias is None for name in adapters
    )


def enable_fused_lora_linear(model: nn.Module) -> int:
    """Switch every PEFT LoRA ``Linear`` of a model to ``FusedLoraLinearForward``; calling it again changes nothing.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA ``Linear`` layers).

    Returns:
        How many layers use the fused forward.
    """
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            if not isinstance(module.__dict__.get("forward"), FusedLoraLinearForward):
                module.forward = FusedLoraLinearForward(module)
            count += 1
    return count


def disable_fused_lora_linear(model: nn.Module) -> int:
    """Give every layer switched by ``enable_fused_lora_linear`` PEFT's forward back.

    Args:
        model: the model that was passed to ``enable_fused_lora_linear``.

    Returns:
        How many layers went back to PEFT's forward.
    """
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedLoraLinearForward):
            del module.forward
            count += 1
    return count
