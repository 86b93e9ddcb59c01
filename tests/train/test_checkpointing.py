"""Selective activation checkpointing: the plan for a byte budget, the flags, exact losses and gradients with any
set of checkpointed layers (offload included) on the tiny gpt-oss, and ``osstune sft`` / ``--dry_run`` with it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn
from transformers import set_seed

from osstune.cli import build_parser, main
from osstune.config import TemplateArgs, parse_flags
from osstune.errors import OsstuneError
from osstune.models.memory import (
    LoraLayout,
    TrainingShape,
    activation_bytes,
    activation_overhead_bytes,
    format_bytes,
    kept_activation_bytes,
    layer_activation_bytes,
    layer_activation_sizes,
    norm_bytes,
)
from osstune.train import checkpointing, dry_run
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs, checkpoint_mode
from osstune.train.checkpointing import (
    SHARDED_AUTO_NOTE,
    CheckpointPlan,
    apply_checkpointing,
    decoder_layers,
    plan_checkpointing,
)
from osstune.train.dry_run import plan_tables, plan_training
from osstune.train.sft import SftConfig, training_arguments

GIB = 2**30
DATE = "2026-01-01"
TINY_CONFIG = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_local_experts": 8,
               "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "num_hidden_layers": 4, "vocab_size": 3072}
"""The tiny gpt-oss's sizes (osstune.models.gpt_oss.tiny), as its config.json gives them."""
TINY_LAYOUT = LoraLayout(rank=4, expert_layers=frozenset(range(4)))
TINY_TRAINABLE = 4 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (64 + 32) + 4 * (64 + 64)
                      + 4 * 8 * (64 + 128) + 4 * 8 * (64 + 64))
"""LoRA r=4 on q/k/v/o and both expert stacks of the tiny model's 4 layers: r x (in + out) each."""


def plan(mode: str, full: list[int], inputs: list[int], free: int | None, reserve: int = 0,
         offload: bool = False) -> CheckpointPlan:
    return plan_checkpointing(mode, num_layers=len(full), free_bytes=free, layer_bytes_full=full,
                              layer_bytes_checkpointed=inputs, reserve_bytes=reserve, offload=offload)


# --- the plan ------------------------------------------------------------------------------------------------------

def test_true_and_false_ignore_the_budget() -> None:
    sizes = [100] * 4
    assert plan("true", sizes, [10] * 4, free=10**9).checkpointed == (0, 1, 2, 3)
    assert plan("false", sizes, [10] * 4, free=0).checkpointed == ()
    assert plan("true", sizes, [10] * 4, free=None).describe() == "checkpointing 4 of 4 layers (true)"
    assert plan("false", sizes, [10] * 4, free=None).describe() == "checkpointing 0 of 4 layers (false)"


@pytest.mark.parametrize(("free", "checkpointed"), [
    (50 + 400, ()),  # all four layers' activations fit: nothing recomputed
    (50 + 399, (0, 1)),  # three would need 3 x 100 + 10 + 100 (one recomputed) = 410; two need 320
    (50 + 320, (0, 1)),
    (50 + 319, (0, 1, 2)),  # one: 100 + 3 x 10 + 100 = 230
    (50 + 140, (0, 1, 2, 3)),  # none: 4 x 10 + 100
    (50 + 139, (0, 1, 2, 3)),  # does not fit even so: every layer, and the line says it
])
def test_auto_keeps_as_many_layers_as_fit_the_last_first(free: int, checkpointed: tuple[int, ...]) -> None:
    result = plan("auto", [100] * 4, [10] * 4, free=free, reserve=50)
    assert result.checkpointed == checkpointed
    assert result.device_bytes == kept_activation_bytes([100] * 4, [10] * 4, set(checkpointed), offload=False)
    assert result.device_bytes is not None and (result.device_bytes <= free - 50) == (free != 50 + 139)


def test_auto_leaves_the_cheapest_layers_uncheckpointed_first() -> None:
    # Layers 1 and 3 carry expert LoRA and save more; 0 and 2 go first (2 before 0: the last first among equals).
    full, inputs = [100, 150, 100, 150], [10] * 4
    assert plan("auto", full, inputs, free=279).checkpointed == (0, 1, 2, 3)  # 4 x 10 + 150 recomputed
    assert plan("auto", full, inputs, free=369).checkpointed == (0, 1, 3)  # 100 + 3 x 10 + 150 = 280
    assert plan("auto", full, inputs, free=370).checkpointed == (1, 3)  # 200 + 2 x 10 + 150
    # Checkpointing layer 1 alone would need 350 + 10 + 150 = 510, more than checkpointing nothing (500).
    assert plan("auto", full, inputs, free=499).checkpointed == (1, 3)
    assert plan("auto", full, inputs, free=500).checkpointed == ()


def test_offloaded_inputs_do_not_count_against_the_device() -> None:
    on_device = plan("auto", [100] * 4, [10] * 4, free=300)
    offloaded = plan("auto", [100] * 4, [10] * 4, free=300, offload=True)
    assert on_device.checkpointed == (0, 1, 2)  # two un-checkpointed would need 200 + 20 + 100 = 320
    assert offloaded.checkpointed == (0, 1)  # 200 + 100: the inputs are in host RAM
    assert (offloaded.host_bytes, offloaded.device_bytes) == (20, 300)
    assert on_device.host_bytes == 0


def test_unknown_free_memory_checkpoints_every_layer() -> None:
    result = plan("auto", [100] * 4, [2**20] * 4, free=None, offload=True)
    assert result.checkpointed == (0, 1, 2, 3)
    assert result.describe() == ("checkpointing 4 of 4 layers (auto: free device memory unknown, so every layer); "
                                 "their inputs (4.0 MiB) held in host RAM")


def test_describe_in_gib() -> None:
    def gib_plan(free: float, offload: bool = False) -> CheckpointPlan:
        return plan_checkpointing("auto", num_layers=4, free_bytes=int(free * GIB),
                                  layer_bytes_full=[2 * GIB, 2 * GIB, 2 * GIB, 3 * GIB],
                                  layer_bytes_checkpointed=[GIB // 4] * 4, reserve_bytes=3 * GIB, offload=offload,
                                  micro_batch=(4, 2048))

    fits = gib_plan(10.5)  # 7.5 GiB left: layers 1, 2 keep 2 x 2, plus 2 x 0.25 inputs and 3 for layer 3 recomputed
    assert fits.checkpointed == (0, 3) and fits.device_bytes == int(7.5 * GIB)
    assert fits.describe() == ("checkpointing 2 of 4 layers (auto: 10.5 GiB free, 3.0 GiB reserved, 2.0 GiB to "
                               "3.0 GiB per un-checkpointed layer at 4 x 2048)")
    tight = gib_plan(6)
    assert tight.checkpointed == (0, 1, 2, 3)
    assert tight.describe() == ("checkpointing 4 of 4 layers (auto: 6.0 GiB free, 3.0 GiB reserved, 2.0 GiB to "
                                "3.0 GiB per un-checkpointed layer at 4 x 2048); even so the layers' activations need "
                                "4.0 GiB of the 3.0 GiB left: lower --max_length or the batch size, or pass "
                                "--offload_activations true")
    assert gib_plan(6, offload=True).describe() == (
        "checkpointing 4 of 4 layers (auto: 6.0 GiB free, 3.0 GiB reserved, 2.0 GiB to 3.0 GiB per "
        "un-checkpointed layer at 4 x 2048); their inputs (1.0 GiB) held in host RAM")


def test_bad_plans_are_clear_errors() -> None:
    with pytest.raises(OsstuneError, match="no layer is checkpointed"):
        plan("false", [1], [1], free=None, offload=True)
    with pytest.raises(OsstuneError, match="expected true, false or auto"):
        plan("some", [1], [1], free=None)
    with pytest.raises(ValueError, match="expected 2"):
        plan_checkpointing("true", num_layers=2, free_bytes=None, layer_bytes_full=[1], layer_bytes_checkpointed=[1],
                           reserve_bytes=0, offload=False)


# --- the flags -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "mode"), [(True, "true"), (False, "false"), ("True", "true"), ("1", "true"),
                                             ("no", "false"), ("OFF", "false"), ("auto", "auto"), ("Auto", "auto")])
def test_checkpoint_mode_spellings(value: object, mode: str) -> None:
    assert checkpoint_mode(value) == mode
    assert TrainArgs(gradient_checkpointing=value).gradient_checkpointing == mode  # type: ignore[arg-type]


def test_flags_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]

    def train_args(argv: list[str]) -> TrainArgs:
        return parse_flags("sft", argv, groups, parser)[TrainArgs]

    assert (TrainArgs().gradient_checkpointing, TrainArgs().offload_activations) == ("true", False)
    assert train_args(["--gradient_checkpointing", "True"]).gradient_checkpointing == "true"
    parsed = train_args(["--gradient_checkpointing", "auto", "--offload_activations", "true"])
    assert (parsed.gradient_checkpointing, parsed.offload_activations) == ("auto", True)
    config = tmp_path / "run.yaml"
    config.write_text("gradient_checkpointing: false\n")
    assert train_args(["--config", str(config)]).gradient_checkpointing == "false"
    with pytest.raises(OsstuneError, match="--gradient_checkpointing sometimes: expected true, false or auto"):
        train_args(["--gradient_checkpointing", "sometimes"])


def test_the_trainer_checkpoints_only_under_sharding(tmp_path: Path) -> None:
    plain = training_arguments(TrainArgs(output_dir=str(tmp_path)), 7, tmp_path, False, False, False)
    assert plain.activation_checkpointing is False
    sharded = training_arguments(TrainArgs(output_dir=str(tmp_path), fsdp="full_shard", gradient_checkpointing="auto",
                                           offload_activations=True), 7, tmp_path, False, False, False)
    assert sharded.activation_checkpointing is True
    assert sharded.activation_checkpointing_kwargs == {"use_reentrant": False, "offload": True}
    off = training_arguments(TrainArgs(output_dir=str(tmp_path), fsdp="full_shard", gradient_checkpointing="false"),
                             7, tmp_path, False, False, False)
    assert off.activation_checkpointing is False


# --- the memory estimate -------------------------------------------------------------------------------------------

def test_liger_rmsnorm_saves_its_input_in_the_compute_dtype() -> None:
    # Two RMSNorms per layer: each keeps H * b + 4 bytes per token instead of 4H + 4 (tests/gpu measures liger's).
    assert norm_bytes(64, 2, fused=False) == 4 * 64 + 4 and norm_bytes(64, 2, fused=True) == 2 * 64 + 4
    shape = TrainingShape(micro_batch=2, seq_len=32, checkpointing=True, attn_impl="flex_attention")
    plain, _ = layer_activation_sizes(TINY_CONFIG, lora=TINY_LAYOUT, shape=shape, dtype_bytes=2)
    fused, _ = layer_activation_sizes(TINY_CONFIG, lora=TINY_LAYOUT,
                                      shape=TrainingShape(**{**vars(shape), "fused_norm": True}), dtype_bytes=2)
    assert [a - b for a, b in zip(plain, fused)] == [64 * 2 * (4 - 2) * 64] * 4


def test_activation_estimate_follows_the_checkpointed_layers() -> None:
    shape = TrainingShape(micro_batch=2, seq_len=32, checkpointing=True, attn_impl="flex_attention")
    layer = layer_activation_bytes(TINY_CONFIG, layer=0, lora=TINY_LAYOUT, seq_len=32, dtype_bytes=2,
                                   attn_impl="flex_attention")
    tokens, tail = 64, 4 * 64 + 4 + 8 + 16 * 2
    full, inputs = layer_activation_sizes(TINY_CONFIG, lora=TINY_LAYOUT, shape=shape, dtype_bytes=2)
    assert (full, inputs) == ([tokens * layer] * 4, [tokens * 64 * 2] * 4)
    assert activation_overhead_bytes(TINY_CONFIG, shape=shape, dtype_bytes=2) == tokens * tail

    def estimate(**fields: Any) -> int:
        return activation_bytes(TINY_CONFIG, lora=TINY_LAYOUT, shape=TrainingShape(**{**vars(shape), **fields}),
                                dtype_bytes=2)

    every = tokens * (4 * 64 * 2 + layer + tail)
    assert estimate() == estimate(checkpointed_layers=frozenset(range(4))) == every
    assert estimate(checkpointing=False) == tokens * (4 * layer + tail)
    # layers 2 and 3 un-checkpointed: their tensors, the inputs of 0 and 1, and one of those recomputed
    assert estimate(checkpointed_layers=frozenset({0, 1})) == tokens * (2 * layer + 2 * 64 * 2 + layer + tail)
    assert estimate(checkpointed_layers=frozenset({0, 1}), offload=True) == tokens * (3 * layer + tail)


# --- applying the plan on the tiny gpt-oss -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model(tiny_bf16_dir: Path) -> nn.Module:
    """The tiny gpt-oss in float32 with osstune's LoRA (dropout 0.1 on attention), B randomised so that every LoRA
    weight gets a gradient."""
    from osstune.models.loading import load_model
    from osstune.models.lora import LoraSpec, apply_lora

    quiet = Console(file=io.StringIO())
    set_seed(0)
    model = apply_lora(load_model(tiny_bf16_dir, torch_dtype="float32", console=quiet).model,
                       LoraSpec(rank=4, alpha=8, dropout=0.1), console=quiet)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model.train()


def one_step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """Loss, LoRA gradients and per-layer forward counts (of each layer's first norm) of one training step on a
    fixed batch, with a fixed dropout seed."""
    ids = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(2))
    layers = decoder_layers(model)
    calls = [0] * len(layers)

    def count(index: int) -> Any:
        def hook(*_: Any) -> None:
            calls[index] += 1
        return hook

    hooks = [layer.input_layernorm.register_forward_hook(count(i)) for i, layer in enumerate(layers)]
    model.zero_grad()
    torch.manual_seed(3)
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for handle in hooks:
            handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.fixture(scope="module")
def reference(lora_model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of :func:`one_step` without checkpointing (the model's weights never change here)."""
    apply_checkpointing(lora_model, CheckpointPlan(mode="false", num_layers=4, checkpointed=(), offload=False))
    loss, grads, calls = one_step(lora_model)
    assert calls == [1, 1, 1, 1]
    assert len(grads) == 4 * (4 + 2) * 2 and all(g.abs().sum() > 0 for g in grads.values())
    return loss, grads


@pytest.mark.parametrize(("checkpointed", "offload"), [((0, 1, 2, 3), False), ((1, 3), False), ((), False),
                                                       ((0, 2), True), ((0, 1, 2, 3), True)])
def test_any_plan_gives_exactly_the_reference_loss_and_gradients(
        lora_model: nn.Module, reference: tuple[torch.Tensor, dict[str, torch.Tensor]],
        checkpointed: tuple[int, ...], offload: bool) -> None:
    # Exact equality (tolerance 0): on the CPU the recomputed forward repeats the same kernels on the same inputs,
    # with the dropout RNG state restored, so every saved tensor is bit-identical to the original.
    ref_loss, ref_grads = reference
    hooks = apply_checkpointing(lora_model, CheckpointPlan(mode="true", num_layers=4, checkpointed=checkpointed,
                                                           offload=offload))
    loss, grads, calls = one_step(lora_model)
    assert calls == [2 if i in checkpointed else 1 for i in range(4)]  # checkpointed layers run again in backward
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    if not offload:
        assert hooks is None
    else:
        # exactly one tensor per checkpointed layer went through the offload hooks: its input [2, 24, 64] float32
        assert hooks is not None
        assert (hooks.tensors, hooks.bytes) == (len(checkpointed), len(checkpointed) * 2 * 24 * 64 * 4)


def test_offload_packs_saved_inputs_into_host_memory(lora_model: nn.Module) -> None:
    hooks = apply_checkpointing(lora_model, CheckpointPlan(mode="true", num_layers=4, checkpointed=(1,), offload=True))
    assert hooks is not None
    packed: list[tuple[torch.device, torch.Tensor]] = []
    pack = hooks.pack

    def spy(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        packed.append(pack(tensor))
        return packed[-1]

    hooks.pack = spy  # type: ignore[method-assign]
    one_step(lora_model)
    ((device, held),) = packed
    assert device == torch.device("cpu") and held.device.type == "cpu" and held.shape == (2, 24, 64)
    assert torch.equal(hooks.unpack((device, held)), held)


def test_flags_follow_the_plan_and_a_false_plan_undoes_transformers_checkpointing(lora_model: nn.Module) -> None:
    inner = lora_model.base_model.model.model
    assert decoder_layers(lora_model) == list(inner.layers)
    inner_type = type(inner.layers[0]).__name__
    assert inner_type == "GptOssDecoderLayer"
    lora_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert one_step(lora_model)[2] == [2, 2, 2, 2]
    apply_checkpointing(lora_model, CheckpointPlan(mode="false", num_layers=4, checkpointed=(), offload=False))
    assert [layer.gradient_checkpointing for layer in inner.layers] == [False] * 4
    assert inner.gradient_checkpointing is False  # the model-level flag (which turns the KV cache off) follows
    assert one_step(lora_model)[2] == [1, 1, 1, 1]
    apply_checkpointing(lora_model, CheckpointPlan(mode="true", num_layers=4, checkpointed=(2,), offload=False))
    assert [layer.gradient_checkpointing for layer in inner.layers] == [False, False, True, False]
    assert inner.gradient_checkpointing is True
    with pytest.raises(OsstuneError, match="the checkpointing plan is for 5 layers; the model has 4"):
        apply_checkpointing(lora_model, CheckpointPlan(mode="true", num_layers=5, checkpointed=(0,), offload=False))
    with pytest.raises(OsstuneError, match="found: none"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# --- osstune sft and --dry_run -------------------------------------------------------------------------------------

def sft_config(model: Path, data: Path, **train_kw: Any) -> SftConfig:
    return SftConfig(
        load=LoadArgs(model=str(model), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(per_device_train_batch_size=4, **train_kw),
        track=TrackArgs(report_to=["none"]),
    )


def tiny_reserve_and_layers(checkpointed: set[int], *, offload: bool) -> tuple[int, int]:
    """What ``auto`` reserves on the tiny model (float32, eager attention, LoRA r=4, micro-batch 4 x 108, no
    headroom): LoRA gradients and AdamW state, the logits at the loss and the activations outside the layers; and
    what the layers keep when ``checkpointed`` are."""
    shape = TrainingShape(micro_batch=4, seq_len=108, checkpointing=True, attn_impl="eager")
    full, inputs = layer_activation_sizes(TINY_CONFIG, lora=TINY_LAYOUT, shape=shape, dtype_bytes=4)
    reserve = TINY_TRAINABLE * (4 + 8) + shape.tokens * 3072 * (4 + 8) + activation_overhead_bytes(
        TINY_CONFIG, shape=shape, dtype_bytes=4)
    return reserve, kept_activation_bytes(full, inputs, checkpointed, offload=offload)


def test_sft_auto_with_offload_end_to_end(tmp_path: Path, tiny_bf16_dir: Path, data_file: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU reports no device memory; pretend a device with room for the activations of two layers.
    reserve, layers = tiny_reserve_and_layers({0, 1}, offload=True)
    free = reserve + layers
    monkeypatch.setattr(checkpointing, "device_memory", lambda device: (free, 0))
    applied: list[CheckpointPlan] = []
    monkeypatch.setattr(checkpointing, "apply_checkpointing",
                        lambda model, plan: applied.append(plan) or apply_checkpointing(model, plan))
    code = main(["sft", "--model", str(tiny_bf16_dir), "--dataset", str(data_file), "--torch_dtype", "float32",
                 "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                 "--per_device_train_batch_size", "4", "--split_dataset_ratio", "0",
                 "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--eval_generation_samples", "0",
                 "--current_date", DATE, "--lora_rank", "4",
                 "--gradient_checkpointing", "auto", "--offload_activations", "true"])
    assert code == 0
    (plan_used,) = applied
    assert plan_used.checkpointed == (0, 1) and plan_used.offload and plan_used.micro_batch == (4, 108)
    assert (plan_used.reserve_bytes, plan_used.device_bytes) == (reserve, layers)
    out = capsys.readouterr().out
    host = format_bytes(2 * 4 * 108 * 64 * 4)
    assert (f"checkpointing 2 of 4 layers (auto: {format_bytes(free)} free, "
            f"{format_bytes(plan_used.reserve_bytes)} reserved") in out
    assert f"per un-checkpointed layer at 4 x 108); their inputs ({host}) held in host RAM\n" in out
    (run_dir,) = (tmp_path / "out").iterdir()
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["gradient_checkpointing"], args["offload_activations"]) == ("auto", True)
    steps = [json.loads(line)["step"] for line in (run_dir / "logging.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]


def test_dry_run_prints_and_estimates_the_plan(tiny_bf16_dir: Path, data_file: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU `auto` cannot measure a GPU: every layer, and the estimate is the one of `true`.
    unknown = plan_training(sft_config(tiny_bf16_dir, data_file, gradient_checkpointing="auto"), world_size=1)
    every = plan_training(sft_config(tiny_bf16_dir, data_file), world_size=1)
    assert unknown.checkpointing.checkpointed == (0, 1, 2, 3) and unknown.memory == every.memory
    assert unknown.shape == every.shape == TrainingShape(micro_batch=4, seq_len=108, checkpointing=True,
                                                         attn_impl="flex_attention")

    # With 100 MiB free on a 0-byte device (no headroom), the tiny model leaves every layer un-checkpointed.
    monkeypatch.setattr(dry_run, "device_memory", lambda device: (100 * 2**20, 0))
    roomy = plan_training(sft_config(tiny_bf16_dir, data_file, gradient_checkpointing="auto"), world_size=1)
    assert roomy.checkpointing.checkpointed == ()
    assert roomy.shape.checkpointing is False
    nothing = plan_training(sft_config(tiny_bf16_dir, data_file, gradient_checkpointing="false"), world_size=1)
    assert roomy.memory == nothing.memory
    assert roomy.memory.activations > every.memory.activations

    # Under ZeRO-3 (and FSDP) `auto` checkpoints every layer whatever the device has free, and says why.
    printed = io.StringIO()
    sharded = plan_training(sft_config(tiny_bf16_dir, data_file, gradient_checkpointing="auto", deepspeed="zero3",
                                       offload_activations=True), world_size=1,
                            console=Console(file=printed, width=400))
    assert sharded.checkpointing.checkpointed == (0, 1, 2, 3) and sharded.shape.offload
    assert SHARDED_AUTO_NOTE in printed.getvalue()
    table = io.StringIO()
    for item in plan_tables(sharded):
        Console(file=table, width=400).print(item)
    host = format_bytes(4 * 4 * 108 * 64 * 4)
    assert (f"│ checkpointing   │ 4 of 4 layers (auto: free device memory unknown, so every layer); their inputs "
            f"({host}) held in host RAM │") in table.getvalue()
    assert sharded.memory.activations == activation_bytes(
        TINY_CONFIG, lora=TINY_LAYOUT, shape=sharded.shape, dtype_bytes=4) < every.memory.activations
