"""LoRA on the tiny gpt-oss (attention, router, experts in PEFT's format) and on a generic model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from rich.console import Console
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.moe_lora import GroupedExpertLoraForward
from osstune.models.loading import load_model
from osstune.models.lora import LoraSpec, apply_lora, lora_targets, trainable_summary

LAYERS, HIDDEN, EXPERTS, INTERMEDIATE, VOCAB = 4, 64, 8, 64, 3072
"""The tiny model's sizes (write_tiny_model's defaults; the vocabulary is the tokenizer's, rounded to 64)."""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PREFIX = "base_model.model."


def quiet() -> Console:
    """A console that prints nowhere."""
    return Console(file=io.StringIO())


def base(tiny_model_dir: Path) -> nn.Module:
    """A freshly loaded tiny gpt-oss in float32."""
    return load_model(tiny_model_dir, torch_dtype="float32", console=quiet()).model


def lora_module_names(model: nn.Module) -> set[str]:
    """Names (without PEFT's prefix) of the modules carrying LoRA, outermost wrappers only."""
    return {
        name.removeprefix(PREFIX) for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and not name.endswith(".base_layer")
    }


def input_ids() -> torch.Tensor:
    """A fixed batch of 2 sequences of 11 tokens."""
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def randomise_lora(model: nn.Module) -> None:
    """Give every LoRA weight (B included, which PEFT initialises to zero) random non-zero values."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def expert_names(layers: range | tuple[int, ...]) -> list[str]:
    return [f"{layer}.mlp.experts.{name}" for layer in layers for name in ("gate_up_proj", "down_proj")]


def test_all_linear_wraps_exactly_the_attention_projections(tiny_model_dir: Path):
    attention = {f"model.layers.{layer}.self_attn.{proj}" for layer in range(LAYERS) for proj in ATTENTION}
    routers = {f"model.layers.{layer}.mlp.router" for layer in range(LAYERS)}

    model = apply_lora(base(tiny_model_dir), LoraSpec(target_experts="none"), console=quiet())
    assert lora_module_names(model) == attention
    assert model.peft_config["default"].target_modules == set(ATTENTION)

    model = apply_lora(base(tiny_model_dir), LoraSpec(target_modules=("all-router",), target_experts="none"), quiet())
    assert lora_module_names(model) == attention | routers
    assert model.peft_config["default"].target_parameters == [f"{layer}.mlp.router.weight" for layer in range(LAYERS)]

    model = apply_lora(base(tiny_model_dir), LoraSpec(target_modules=("q_proj", "router"), target_experts="none"), quiet())
    assert lora_module_names(model) == {f"model.layers.{layer}.self_attn.q_proj" for layer in range(LAYERS)} | routers


@pytest.mark.parametrize(
    ("target_experts", "target_parameters", "expected"),
    [
        ("all", (), expert_names(range(LAYERS))),
        ("none", (), []),
        ("1,3", (), expert_names((1, 3))),
        (" 3, 1,3 ", (), expert_names((1, 3))),
        ("all", ("2.mlp.experts.down_proj",), ["2.mlp.experts.down_proj"]),
    ],
)
def test_expert_targets(tiny_model_dir: Path, target_experts: str, target_parameters: tuple[str, ...], expected: list[str]):
    spec = LoraSpec(target_experts=target_experts, target_parameters=target_parameters)
    model = apply_lora(base(tiny_model_dir), spec, console=quiet())
    assert (model.peft_config["default"].target_parameters or []) == expected
    wrapped = {
        f"{layer}.mlp.experts.{module.parameter_name}"
        for layer, block in enumerate(model.base_model.model.model.layers)
        for module in block.mlp.modules() if isinstance(module, ParamWrapper)
    }
    assert wrapped == set(expected)


def test_bad_expert_targets_are_clear_errors(tiny_model_dir: Path):
    with pytest.raises(OsstuneError, match="--target_experts 7,x: use all, none, or comma-separated"):
        LoraSpec(target_experts="7,x")
    with pytest.raises(OsstuneError, match=r"layers \[4\] do not exist"):
        lora_targets(base(tiny_model_dir), LoraSpec(target_experts="1,4"))
    with pytest.raises(OsstuneError, match="LoRA targets nothing"):
        LoraSpec(target_modules=(), target_experts="none")
    with pytest.raises(OsstuneError, match="--lora_rank 0"):
        LoraSpec(rank=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_saved_adapter_is_peft_format_and_reloads_with_plain_peft(tiny_model_dir: Path, tmp_path: Path):
    spec = LoraSpec(rank=4, alpha=16, target_modules=("all-router",))
    model = apply_lora(base(tiny_model_dir), spec, console=quiet())
    randomise_lora(model)
    model.eval()
    layers = model.base_model.model.model.layers
    assert all(isinstance(block.mlp.experts.__dict__["forward"], GroupedExpertLoraForward) for block in layers)
    with torch.no_grad():
        logits = model(input_ids()).logits
        with model.disable_adapter():
            base_logits = model(input_ids()).logits
    assert ((logits - base_logits).norm() / base_logits.norm()).item() > 1e-2  # the adapter changes the output

    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["target_parameters"] == expert_names(range(LAYERS)) + [
        f"{layer}.mlp.router.weight" for layer in range(LAYERS)
    ]
    assert sorted(config["target_modules"]) == sorted(ATTENTION)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.0)
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    r_e = 4 * EXPERTS
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items() if ".layers.1.mlp." in name}
    # PEFT nests one wrapper per parameter: down_proj (sorted first) outermost, gate_up_proj inside it.
    assert shapes == {
        f"{PREFIX}model.layers.1.mlp.experts.lora_A.weight": (r_e, INTERMEDIATE),
        f"{PREFIX}model.layers.1.mlp.experts.lora_B.weight": (HIDDEN, r_e),
        f"{PREFIX}model.layers.1.mlp.experts.base_layer.lora_A.weight": (r_e, HIDDEN),
        f"{PREFIX}model.layers.1.mlp.experts.base_layer.lora_B.weight": (2 * INTERMEDIATE, r_e),
        f"{PREFIX}model.layers.1.mlp.router.lora_A.weight": (4, HIDDEN),
        f"{PREFIX}model.layers.1.mlp.router.lora_B.weight": (EXPERTS, 4),
    }

    reloaded = PeftModel.from_pretrained(base(tiny_model_dir), tmp_path / "adapter").eval()
    assert not any("forward" in module.__dict__ for module in reloaded.modules() if isinstance(module, ParamWrapper))
    with torch.no_grad():
        reference = reloaded(input_ids()).logits
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-5


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(tiny_model_dir: Path, use_rslora: bool, scaling: float):
    spec = LoraSpec(rank=4, alpha=16, use_rslora=use_rslora, target_modules=("all-router",))
    model = apply_lora(base(tiny_model_dir), spec, console=quiet())
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == LAYERS * (len(ATTENTION) + 1 + 2)  # attention, router, two expert stacks
    assert {module.scaling["default"] for module in layers} == {scaling}


def test_only_the_adapter_trains(tiny_model_dir: Path):
    model = apply_lora(base(tiny_model_dir), LoraSpec(target_modules=("all-router",)), console=quiet())
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    lora = {name for name in params if ".lora_A." in name or ".lora_B." in name}
    assert len(lora) == 2 * LAYERS * (len(ATTENTION) + 1 + 2)
    for name, param in params.items():
        if name in lora:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # B starts at zero, so the gradient reaches B (never A) on the first step, through every target kind.
    for name in ("self_attn.q_proj", "mlp.router", "mlp.experts", "mlp.experts.base_layer"):
        assert params[f"{PREFIX}model.layers.0.{name}.lora_B.default.weight"].grad.abs().sum() > 0


def test_dropout_on_module_targets_only_and_said(tiny_model_dir: Path):
    buffer = io.StringIO()
    model = apply_lora(base(tiny_model_dir), LoraSpec(dropout=0.1), console=Console(file=buffer, width=300))
    assert model.peft_config["default"].lora_dropout == 0.0
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            assert isinstance(module.lora_dropout["default"], nn.Identity)
        elif isinstance(module, LoraLayer):
            dropout = module.lora_dropout["default"]
            assert isinstance(dropout, nn.Dropout) and dropout.p == 0.1
    assert buffer.getvalue() == (
        "lora_dropout 0.1 applies to the 16 LoRA module targets; the LoRA on parameter targets (experts, router) "
        "runs without dropout, which PEFT does not support there\n"
    )

    buffer = io.StringIO()
    apply_lora(base(tiny_model_dir), LoraSpec(dropout=0.1, target_modules=(), target_experts="3"), Console(file=buffer))
    assert buffer.getvalue().startswith("lora_dropout 0.1 is not applied; the LoRA on parameter targets")

    buffer = io.StringIO()
    model = apply_lora(base(tiny_model_dir), LoraSpec(dropout=0.1, target_experts="none"), Console(file=buffer))
    assert model.peft_config["default"].lora_dropout == 0.1
    assert buffer.getvalue() == ""


def test_trainable_summary(tiny_model_dir: Path):
    model = apply_lora(base(tiny_model_dir), LoraSpec(target_modules=("all-router",)), console=quiet())
    # r=8 per layer: q/o 2*(8*64 + 64*8), k/v 2*(8*64 + 32*8), router 8*64 + 8*8,
    # gate_up 64*64 + 128*64, down 64*64 + 64*64; the base model has 845,168 parameters.
    trainable = LAYERS * (2 * 1024 + 2 * 768 + 576 + 12288 + 8192)
    assert trainable == 98_560
    assert trainable_summary(model) == (
        "trainable params 98,560 of 943,728 (10.4437%); 8 of 8 expert stacks on the grouped path"
    )
    attention_only = apply_lora(base(tiny_model_dir), LoraSpec(target_experts="none"), console=quiet())
    assert trainable_summary(attention_only) == (
        "trainable params 14,336 of 859,504 (1.6679%); no expert LoRA"
    )


def llama() -> LlamaForCausalLM:
    """A 2-layer random Llama."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config)


def test_generic_model_takes_peft_all_linear():
    model = apply_lora(llama(), LoraSpec(), console=quiet())
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert lora_module_names(model) == {f"model.layers.{layer}.{name}" for layer in range(2) for name in projections}
    assert model.peft_config["default"].target_parameters is None
    assert trainable_summary(model).endswith("; no expert LoRA")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LoraSpec(target_experts="7,15"), "--target_experts / --target_parameters select gpt-oss experts; this model"),
        (LoraSpec(target_parameters=("0.mlp.down_proj.weight",)), "select gpt-oss experts; this model is llama"),
        (LoraSpec(target_modules=("all-router",)), "--target_modules all-router is for gpt-oss; this model is llama"),
        (LoraSpec(target_modules=("all-linear", "lm_head")), "all-linear already selects every linear layer"),
    ],
)
def test_generic_model_refuses_gpt_oss_targets(spec: LoraSpec, message: str):
    with pytest.raises(OsstuneError, match=message):
        apply_lora(llama(), spec, console=quiet())
