"""LoRA on the gpt-oss experts in PEFT's own format, computed grouped as ``(X @ A) @ B``.

PEFT creates the adapter (``LoraConfig(target_parameters=expert_target_parameters(config))``): its
``ParamWrapper`` stores, for an expert weight stack ``W`` of shape [E, in, out], ``lora_A`` [r * E, in] and
``lora_B`` [out, r * E], with expert e's update ``scaling * A_e^T @ B_e^T`` where ``A_e = lora_A[e*r:(e+1)*r]``
(expert-major rows) and ``B_e = lora_B[:, e::E]`` (rank-major columns). PEFT applies it by adding that update to
the whole stack on every forward. ``enable_grouped_expert_lora`` keeps PEFT's modules, parameters and file
format, and replaces only the forward of each wrapped ``GptOssExperts`` by one that reads the same ``lora_A`` /
``lora_B`` and computes ``x @ W[e] + b[e] + scaling * (x @ A_e^T) @ B_e^T`` for the routed tokens only
(``experts.experts_forward``); experts kept as MXFP4 (``mxfp4_experts.Mxfp4Experts``) are dequantised on the fly.
Saving stays ``model.save_pretrained``, loading stays ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.experts import LoraFactors
from osstune.models.gpt_oss.mxfp4_experts import module_experts_forward

EXPERT_PARAMETERS: tuple[str, ...] = ("gate_up_proj", "down_proj")
"""The expert weight stacks that take LoRA, in PEFT ``target_parameters`` spelling."""


def expert_target_parameters(
    config: PreTrainedConfig,
    layers: Literal["all"] | Sequence[int] = "all",
    parameters: Sequence[str] = EXPERT_PARAMETERS,
) -> list[str]:
    """PEFT ``target_parameters`` names for LoRA on the experts of the chosen layers.

    Args:
        config: the model's config (``num_hidden_layers`` is read).
        layers: ``"all"``, or the 0-based indices of the decoder layers whose experts take LoRA.
        parameters: which expert weight stacks: any of ``gate_up_proj`` and ``down_proj``.

    Returns:
        Names such as ``"7.mlp.experts.gate_up_proj"``, by ascending layer, each layer once.

    Raises:
        OsstuneError: a layer index outside the model or an unknown parameter name.
    """
    num_layers = config.num_hidden_layers
    unknown = [name for name in parameters if name not in EXPERT_PARAMETERS]
    if unknown:
        raise OsstuneError(
            f"expert LoRA cannot target {unknown}: the expert parameters are {', '.join(EXPERT_PARAMETERS)}"
        )
    if layers == "all":
        chosen: Sequence[int] = range(num_layers)
    else:
        outside = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < num_layers]
        if outside:
            raise OsstuneError(
                f"expert LoRA layers {outside} do not exist: the model has layers 0 to {num_layers - 1}"
            )
        chosen = sorted(set(layers))
    return [f"{layer}.mlp.experts.{name}" for layer in chosen for name in parameters]


def peft_lora_factors(wrapper: ParamWrapper, adapter: str) -> LoraFactors:
    """Read one adapter of a PEFT ``ParamWrapper`` on a 3-D expert weight as per-expert LoRA factors.

    Args:
        wrapper: the PEFT wrapper of one expert weight stack ``W`` [E, in, out].
        adapter: the adapter's name, e.g. ``"default"``.

    Returns:
        ``a_EIR`` [E, in, r] and ``b_ERO`` [E, r, out], views of ``lora_A`` and ``lora_B``, and PEFT's scaling
        (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).

    Raises:
        OsstuneError: the adapter's shapes are not PEFT's expert layout for ``W``.
    """
    num_experts, in_features, out_features = wrapper.get_param().shape
    weight_a = wrapper.lora_A[adapter].weight
    weight_b = wrapper.lora_B[adapter].weight
    rank = weight_a.shape[0] // num_experts
    if weight_a.shape != (rank * num_experts, in_features) or weight_b.shape != (out_features, rank * num_experts):
        raise OsstuneError(
            f"adapter {adapter!r} on {wrapper.parameter_name} has lora_A {tuple(weight_a.shape)} and lora_B "
            f"{tuple(weight_b.shape)}; expected [r * {num_experts}, {in_features}] and "
            f"[{out_features}, r * {num_experts}]"
        )
    a_EIR = weight_a.view(num_experts, rank, in_features).transpose(1, 2)
    b_ERO = weight_b.view(out_features, rank, num_experts).permute(2, 1, 0)
    return LoraFactors(a_EIR=a_EIR, b_ERO=b_ERO, scaling=float(wrapper.scaling[adapter]))


class GroupedExpertLoraForward:
    """Forward of a PEFT-wrapped ``GptOssExperts`` that applies the LoRA updates without materialising them.

    Installed by ``enable_grouped_expert_lora`` as the ``forward`` of the outermost ``ParamWrapper``. It reads every
    active adapter of every wrapper in the chain. With adapters disabled or merged it defers to PEFT's own forward.

    Args:
        wrapper: the outermost PEFT wrapper around one ``GptOssExperts``.
    """

    def __init__(self, wrapper: ParamWrapper) -> None:
        self.wrapper = wrapper

    def __call__(
        self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """Run the experts.

        Args:
            hidden_states: token states, [T, H].
            router_indices: experts chosen per token, [T, K].
            routing_weights: weight of each chosen expert, [T, K].

        Returns:
            The mixture's output, [T, H].
        """
        chain = _wrapper_chain(self.wrapper)
        if any(wrapper.disable_adapters or wrapper.merged for wrapper in chain):
            return type(self.wrapper).forward(self.wrapper, hidden_states, router_indices, routing_weights)
        loras: dict[str, list[LoraFactors]] = {name: [] for name in EXPERT_PARAMETERS}
        for wrapper in chain:
            for adapter in wrapper.active_adapters:
                if adapter in wrapper.lora_A:
                    loras[wrapper.parameter_name].append(peft_lora_factors(wrapper, adapter))
        return module_experts_forward(self.wrapper.get_base_layer(), hidden_states, router_indices, routing_weights,
                                      gate_up_loras=loras["gate_up_proj"], down_loras=loras["down_proj"])


def enable_grouped_expert_lora(model: nn.Module) -> int:
    """Switch every PEFT-wrapped ``GptOssExperts`` of a model to the grouped ``(X @ A) @ B`` forward.

    Parameters, names and the saved adapter stay PEFT's. Expert modules whose wrappers also target other
    parameters (e.g. the biases) keep PEFT's forward. Calling it again changes nothing.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT ``ParamWrapper``s).

    Returns:
        How many expert weight stacks now use the grouped forward (two per layer with both stacks targeted).
    """
    count = 0
    for wrapper, chain in _expert_wrappers(model):
        if not isinstance(wrapper.__dict__.get("forward"), GroupedExpertLoraForward):
            wrapper.forward = GroupedExpertLoraForward(wrapper)
        count += len(chain)
    return count


def enable_fused_experts(model: nn.Module) -> int:
    """Give every dense ``GptOssExperts`` that carries no LoRA osstune's fused expert pass as its forward
    (``module_experts_forward`` on its own weights): the same function as transformers' forward, with less kept for
    the backward pass.

    Experts under a PEFT wrapper take ``enable_grouped_expert_lora`` instead, and MXFP4 experts run that path
    already. Calling it again changes nothing.

    Args:
        model: a model or ``PeftModel`` holding gpt-oss experts.

    Returns:
        How many expert layers use it.
    """
    wrapped = {id(wrapper.get_base_layer()) for wrapper, _ in _expert_wrappers(model)}
    count = 0
    for module in model.modules():
        if type(module) is GptOssExperts and id(module) not in wrapped and not _has_parametrizations(module):
            if not is_fused_experts_forward(module):
                module.forward = functools.partial(module_experts_forward, module)
            count += 1
    return count


def is_fused_experts_forward(module: nn.Module) -> bool:
    """Whether ``enable_fused_experts`` switched this experts module to the fused pass.

    Args:
        module: an experts module.
    """
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is module_experts_forward


def _has_parametrizations(module: nn.Module) -> bool:
    """Whether PEFT (or anything else) parametrises the module's weights: its own forward must then run."""
    return bool(getattr(module, "parametrizations", None))


def disable_grouped_expert_lora(model: nn.Module) -> int:
    """Give every expert module switched by ``enable_grouped_expert_lora`` PEFT's forward back.

    Args:
        model: the model that was passed to ``enable_grouped_expert_lora``.

    Returns:
        How many expert weight stacks went back to PEFT's forward.
    """
    count = 0
    for wrapper, chain in _expert_wrappers(model):
        if isinstance(wrapper.__dict__.get("forward"), GroupedExpertLoraForward):
            del wrapper.forward
            count += len(chain)
    return count


def _wrapper_chain(wrapper: ParamWrapper) -> list[ParamWrapper]:
    """The nested PEFT wrappers from ``wrapper`` inwards (PEFT nests one wrapper per targeted parameter).

    Args:
        wrapper: the outermost wrapper.
    """
    chain = [wrapper]
    while isinstance(chain[-1].base_layer, ParamWrapper):
        chain.append(chain[-1].base_layer)
    return chain


def _expert_wrappers(model: nn.Module) -> Iterator[tuple[ParamWrapper, list[ParamWrapper]]]:
    """The outermost wrappers of ``GptOssExperts`` whose targets are all expert weight stacks, with their chains.

    Args:
        model: the model to search.
    """
    wrappers = [module for module in model.modules() if isinstance(module, ParamWrapper)]
    inner = {id(wrapper.base_layer) for wrapper in wrappers}
    for wrapper in wrappers:
        if id(wrapper) in inner:
            continue
        chain = _wrapper_chain(wrapper)
        experts = wrapper.get_base_layer()
        if (
            isinstance(experts, GptOssExperts)
            and getattr(experts, "is_transposed", False)
            and all(link.parameter_name in EXPERT_PARAMETERS for link in chain)
        ):
            yield wrapper, chain
