"""Which parts of a model take LoRA (``LoraSpec``), and putting the adapter on the model with PEFT.

The adapter is plain PEFT: ``model.save_pretrained`` writes it and ``PeftModel.from_pretrained`` loads it without
osstune. On gpt-oss, the attention projections are PEFT ``target_modules``; the experts (and the router, whose
module is not a ``Linear``) are PEFT ``target_parameters``, and the experts then run on osstune's grouped
``(X @ A) @ B`` forward (``osstune.models.gpt_oss.moe_lora``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from rich.console import Console
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.moe_lora import (
    EXPERT_PARAMETERS,
    GroupedExpertLoraForward,
    enable_fused_experts,
    enable_grouped_expert_lora,
    expert_target_parameters,
)
from osstune.models.lora_linear import enable_fused_lora_linear

ALL_LINEAR = "all-linear"
"""``target_modules`` keyword: every linear layer of the attention (gpt-oss), or PEFT's own all-linear (others)."""

ALL_ROUTER = "all-router"
"""``target_modules`` keyword for gpt-oss: ``all-linear`` plus the router of every layer."""

GPT_OSS_ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The linear layers of gpt-oss attention, which ``all-linear`` selects."""

ROUTER_NAMES: tuple[str, ...] = ("router", "mlp.router")
"""Spellings of the gpt-oss router in ``target_modules``; it is targeted through its weight parameter."""


@dataclass(frozen=True)
class LoraSpec:
    """What LoRA trains, with ms-swift's flag meanings.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha; updates are scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        dropout: dropout on the input of the LoRA branch of module targets (PEFT has none for parameter targets).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
        target_modules: module names (suffixes, e.g. ``q_proj``), ``all-linear``, or for gpt-oss ``all-router``.
        target_experts: gpt-oss expert layers taking LoRA on both expert stacks: ``all``, ``none`` or comma-separated
            0-based layer indices such as ``7,15,23``.
        target_parameters: PEFT/TRL ``target_parameters`` names such as ``7.mlp.experts.gate_up_proj``; when given,
            they replace ``target_experts``.
        modules_to_save: modules trained fully and saved with the adapter (e.g. ``lm_head``).
    """

    rank: int = 8
    alpha: float = 32
    dropout: float = 0.05
    use_rslora: bool = False
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    target_experts: str = "all"
    target_parameters: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise OsstuneError(f"--lora_rank {self.rank}: must be a positive integer.")
        if not self.alpha > 0:
            raise OsstuneError(f"--lora_alpha {self.alpha}: must be positive.")
        if not 0 <= self.dropout < 1:
            raise OsstuneError(f"--lora_dropout {self.dropout}: must be at least 0 and below 1.")
        experts = self.expert_layers()
        if not self.target_modules and not self.target_parameters and experts == ():
            raise OsstuneError("LoRA targets nothing: give --target_modules, --target_experts or --target_parameters.")

    def expert_layers(self) -> Literal["all"] | tuple[int, ...]:
        """The layers whose experts ``target_experts`` selects: ``"all"``, or indices (none: empty).

        Raises:
            OsstuneError: ``target_experts`` is neither all, none nor a comma-separated list of layer indices.
        """
        text = self.target_experts.strip().lower()
        if text == "all":
            return "all"
        if text in ("none", ""):
            return ()
        parts = [part.strip() for part in text.split(",")]
        if not all(part.isdigit() for part in parts):
            raise OsstuneError(
                f"--target_experts {self.target_experts}: use all, none, or comma-separated layer indices like 7,15,23."
            )
        return tuple(sorted({int(part) for part in parts}))


def lora_targets(model: nn.Module, spec: LoraSpec) -> tuple[list[str] | str, list[str]]:
    """PEFT ``target_modules`` and ``target_parameters`` for a model.

    Args:
        model: the base model (``PreTrainedModel``).
        spec: what to train.

    Returns:
        ``(target_modules, target_parameters)``. For gpt-oss, ``all-linear`` resolves to q/k/v/o_proj, the router
        to ``{layer}.mlp.router.weight`` parameters and ``target_experts`` to expert parameters, unless
        ``target_parameters`` is given. Other models pass ``all-linear`` (alone) to PEFT unchanged.

    Raises:
        OsstuneError: gpt-oss-only targets on another model, ``all-linear`` mixed with names on another model, or
            expert layers the model does not have.
    """
    if model.config.model_type != "gpt_oss":
        return _generic_targets(model, spec)
    modules: list[str] = []
    router = False
    for name in spec.target_modules:
        if name in (ALL_LINEAR, ALL_ROUTER):
            modules.extend(GPT_OSS_ATTENTION)
            router = router or name == ALL_ROUTER
        elif name in ROUTER_NAMES:
            router = True
        else:
            modules.append(name)
    if spec.target_parameters:
        parameters = list(spec.target_parameters)
    else:
        layers = spec.expert_layers()
        parameters = expert_target_parameters(model.config, layers) if layers else []
    if router:
        parameters += [f"{layer}.mlp.router.weight" for layer in range(model.config.num_hidden_layers)]
    return list(dict.fromkeys(modules)), list(dict.fromkeys(parameters))


def apply_lora(model: nn.Module, spec: LoraSpec, console: Console | None = None) -> PeftModel:
    """Put a fresh LoRA adapter (named ``default``) on a model; only the adapter (and ``modules_to_save``) train.

    PEFT refuses dropout on parameter targets, so with ``dropout > 0`` and parameter targets the adapter is created
    without dropout and dropout is then installed on the module targets only (the saved ``adapter_config.json``
    records ``lora_dropout`` 0, which keeps it loadable by ``PeftModel.from_pretrained``); a line says so. On
    gpt-oss the experts are then switched to the grouped forward.

    Args:
        model: the base model (``PreTrainedModel``), e.g. ``LoadedModel.model``.
        spec: what to train.
        console: where to print notes; a stderr console when None.

    Returns:
        The ``PeftModel``.

    Raises:
        OsstuneError: targets that do not fit the model (see ``lora_targets``), or that match nothing in it.
    """
    console = console or Console(stderr=True)
    target_modules, target_parameters = lora_targets(model, spec)
    split_dropout = spec.dropout > 0 and bool(target_parameters)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0 if split_dropout else spec.dropout,
        use_rslora=spec.use_rslora,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=list(spec.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # PEFT asks transformers a deprecated question while wrapping; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise OsstuneError(f"LoRA targets do not fit the model: {exc}") from None
    if split_dropout:
        wrapped = _install_module_dropout(peft_model, spec.dropout)
        where = f"applies to the {wrapped} LoRA module targets" if wrapped else "is not applied"
        console.print(
            f"lora_dropout {spec.dropout} {where}; the LoRA on parameter targets (experts, router) runs without "
            "dropout, which PEFT does not support there",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    enable_fused_lora_linear(peft_model)
    if model.config.model_type == "gpt_oss":
        enable_grouped_expert_lora(peft_model)
        enable_fused_experts(peft_model)
    return peft_model


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable and total parameters, their ratio, and the expert stacks on the grouped LoRA path.

    Args:
        model: a model, usually the ``PeftModel`` from ``apply_lora``.
    """
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    total = sum(param.numel() for param in model.parameters())
    wrapped = [
        module for module in model.modules()
        if isinstance(module, ParamWrapper) and module.parameter_name in EXPERT_PARAMETERS
        and isinstance(module.get_base_layer(), GptOssExperts)
    ]
    grouped = sum(_grouped_stacks(module) for module in model.modules() if isinstance(module, ParamWrapper))
    share = 100 * trainable / total if total else 0.0
    experts = f"{grouped} of {len(wrapped)} expert stacks on the grouped path" if wrapped else "no expert LoRA"
    return f"trainable params {trainable:,} of {total:,} ({share:.4f}%); {experts}"


def _generic_targets(model: nn.Module, spec: LoraSpec) -> tuple[list[str] | str, list[str]]:
    """``lora_targets`` for a model that is not gpt-oss.

    Args:
        model: the base model.
        spec: what to train.
    """
    model_type = model.config.model_type
    if spec.target_parameters or spec.expert_layers() not in ("all", ()):
        raise OsstuneError(
            f"--target_experts / --target_parameters select gpt-oss experts; this model is {model_type}. "
            "Pass --target_experts none and no --target_parameters."
        )
    if ALL_ROUTER in spec.target_modules:
        raise OsstuneError(f"--target_modules {ALL_ROUTER} is for gpt-oss; this model is {model_type}.")
    if ALL_LINEAR in spec.target_modules:
        if len(spec.target_modules) > 1:
            raise OsstuneError(
                f"--target_modules: {ALL_LINEAR} already selects every linear layer of {model_type}; give it alone "
                "or list module names instead."
            )
        return ALL_LINEAR, []
    return list(spec.target_modules), []


def _install_module_dropout(peft_model: PeftModel, dropout: float) -> int:
    """Give the LoRA module targets (not parameter targets) of every adapter a dropout on their input.

    Args:
        peft_model: a model just created by ``get_peft_model`` with ``lora_dropout`` 0.
        dropout: the dropout probability.

    Returns:
        How many modules got dropout.
    """
    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = nn.Dropout(p=dropout)
            count += 1
    return count


def _grouped_stacks(wrapper: ParamWrapper) -> int:
    """How many expert stacks ``wrapper`` runs on the grouped forward (its chain's expert links, if switched).

    Args:
        wrapper: a PEFT ``ParamWrapper``; only an outermost one switched by ``enable_grouped_expert_lora`` counts.
    """
    if not isinstance(wrapper.__dict__.get("forward"), GroupedExpertLoraForward):
        return 0
    count = 0
    link: Any = wrapper
    while isinstance(link, ParamWrapper):
        count += link.parameter_name in EXPERT_PARAMETERS
        link = link.base_layer
    return count
