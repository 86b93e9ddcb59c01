"""``--dry_run``: exact parameter counts, steps and batch, the memory estimate against a hand computation, its
activation model against the tensors autograd really saves, and no weight file read."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from osstune.cli import main
from osstune.config import TemplateArgs
from osstune.models.memory import (
    LoraLayout,
    MemoryEstimate,
    ModelCounts,
    TrainingShape,
    count_parameters,
    estimate_training_memory,
    layer_activation_bytes,
)
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.dry_run import plan_training, steps_per_epoch, training_engine
from osstune.train.sft import SftConfig

DATE = "2026-01-01"

# The tiny gpt-oss (see osstune.models.gpt_oss.tiny): H=64, I=64, 8 experts top-2, 4 heads and 2 KV heads of 16,
# 4 layers, vocabulary 3072; LoRA r=4 on q/k/v/o and both expert stacks of every layer.
TINY_FROZEN = (3072 * 64) * 2 + 64 + 4 * (
    (64 * 64 + 64) + 2 * (64 * 32 + 32) + (64 * 64 + 64) + 4  # q, k, v, o with biases, sinks
    + (8 * 64 + 8)  # router
    + 8 * (64 * 128 + 128) + 8 * (64 * 64 + 64)  # gate_up [E, H, 2I] and down [E, I, H] with biases
    + 2 * 64)  # two RMSNorms
TINY_TRAINABLE = 4 * (
    4 * (64 + 64) + 4 * (64 + 32) + 4 * (64 + 32) + 4 * (64 + 64)  # q, k, v, o: r x (in + out)
    + 4 * 8 * (64 + 128) + 4 * 8 * (64 + 64))  # experts: lora_A [r*E, in], lora_B [out, r*E]
TINY_LAYOUT = LoraLayout(rank=4, expert_layers=frozenset(range(4)))


@pytest.fixture(scope="module")
def weightless_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder without its weights: a dry run must not need them."""
    folder = tmp_path_factory.mktemp("weightless") / "model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, folder / item.name)
    return folder


def sft_config(model: Path, data: Path, **train_kw: object) -> SftConfig:
    return SftConfig(
        load=LoadArgs(model=str(model), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(per_device_train_batch_size=2, num_train_epochs=2, **train_kw),  # type: ignore[arg-type]
        track=TrackArgs(report_to=["none"]),
    )


def test_plan_counts_exactly_without_weights(weightless_dir: Path, data_file: Path) -> None:
    assert not list(weightless_dir.glob("*.safetensors"))
    plan = plan_training(sft_config(weightless_dir, data_file), world_size=2)
    assert TINY_FROZEN == 845_168 == count_parameters(json.loads((weightless_dir / "config.json").read_text()))
    assert plan.counts == ModelCounts(frozen=TINY_FROZEN, trainable=TINY_TRAINABLE, largest_unit=3072 * 64)
    assert plan.lora == TINY_LAYOUT
    assert (plan.train_rows, plan.steps_per_epoch, plan.total_steps, plan.effective_batch) == (24, 6, 12, 4)
    assert plan.engine == "ddp" and plan.world_size == 2
    assert plan.shape == TrainingShape(micro_batch=2, seq_len=108, checkpointing=True, attn_impl="flex_attention")
    assert plan.seq_source == "longest training sample"


@pytest.mark.parametrize("dequant_experts", [0, 2])
def test_mxfp4_experts_count_as_packed_codes(weightless_dir: Path, data_file: Path, dequant_experts: int) -> None:
    dense = plan_training(sft_config(weightless_dir, data_file), world_size=1)
    cfg = sft_config(weightless_dir, data_file)
    cfg = dataclasses.replace(cfg, load=dataclasses.replace(cfg.load, expert_weights="mxfp4",
                                                            dequant_experts=dequant_experts))
    plan = plan_training(cfg, world_size=1)
    stacks = 4 * (8 * 64 * 128 + 8 * 64 * 64)  # gate_up [E, H, 2I] and down [E, I, H] of 4 layers
    largest = 8 * 64 * 128 * (dequant_experts or 8) // 8  # one layer's gate_up, or that many of its experts
    assert plan.counts == ModelCounts(frozen=TINY_FROZEN - stacks, trainable=TINY_TRAINABLE,
                                      largest_unit=3072 * 64, packed=stacks, scratch=largest)
    assert plan.memory.weights == (TINY_FROZEN - stacks) * 4 + stacks * 17 // 32
    assert plan.memory.gathered == largest * 4
    assert dense.memory.total - plan.memory.total == stacks * 4 - stacks * 17 // 32 - largest * 4


def test_memory_estimate_against_a_hand_computation(weightless_dir: Path, data_file: Path) -> None:
    plan = plan_training(sft_config(weightless_dir, data_file), world_size=2)
    b, tokens = 4, 2 * 108
    attention = (4 * 64 + 4) + 64 * b + 4 * 4 * b + 64 * b + (2 * 64 + 2 * 32) * b + 4 * (4 + 3 * b)
    pair = 2 * 8 + 2 * 64 * b + 64 * b + 2 * 4 * b  # indices, gate/up out, expert out, LoRA intermediates
    moe = (4 * 64 + 4) + 2 * (8 + b) + 64 * b + 2 * pair  # norm, router, the expert input (kept once), pairs
    assert attention + moe == 3840
    tail = 4 * 64 + 4 + 8 + 16 * b
    checkpointed = 4 * 64 * b + (attention + moe) + tail  # 4 layer inputs, one layer recomputed
    assert plan.memory == MemoryEstimate(
        weights=TINY_FROZEN * 4, gathered=0, lora=TINY_TRAINABLE * 4, gradients=TINY_TRAINABLE * 4,
        optimizer=TINY_TRAINABLE * 8, activations=tokens * checkpointed, logits=tokens * 3072 * (4 + 8))
    assert plan.memory.total == 13_235_680


def test_sharding_engines_divide_what_they_shard() -> None:
    config = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_local_experts": 8,
              "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "num_hidden_layers": 4, "vocab_size": 3072}
    counts = ModelCounts(frozen=TINY_FROZEN, trainable=TINY_TRAINABLE, largest_unit=3072 * 64)
    shape = TrainingShape(micro_batch=1, seq_len=64, checkpointing=False, attn_impl="eager", fused_loss=True)

    def estimate(engine: str) -> MemoryEstimate:
        return estimate_training_memory(config, dtype=torch.bfloat16, counts=counts, lora=TINY_LAYOUT, shape=shape,
                                        engine=engine, world_size=4)

    ddp, zero2, zero3, fsdp = estimate("ddp"), estimate("zero2"), estimate("zero3"), estimate("fsdp")
    assert (ddp.weights, ddp.gathered, ddp.lora, ddp.gradients, ddp.optimizer) == (
        TINY_FROZEN * 2, 0, TINY_TRAINABLE * 4, TINY_TRAINABLE * 4, TINY_TRAINABLE * 8)
    assert (zero2.weights, zero2.lora, zero2.gradients, zero2.optimizer) == (
        TINY_FROZEN * 2, TINY_TRAINABLE * 4, TINY_TRAINABLE, TINY_TRAINABLE * 2)
    assert zero3 == fsdp
    assert (fsdp.weights, fsdp.gathered, fsdp.lora, fsdp.gradients, fsdp.optimizer) == (
        TINY_FROZEN * 2 // 4, 2 * 3072 * 64 * 2, TINY_TRAINABLE, TINY_TRAINABLE, TINY_TRAINABLE * 2)
    for offload in (estimate("zero3_offload"), estimate("fsdp_offload")):
        assert (offload.weights, offload.lora, offload.gradients, offload.optimizer) == (0, 0, 0, 0)
        assert offload.gathered == fsdp.gathered
    # eager attention keeps its two [seq, seq] masks; the fused loss keeps no logits
    layers = sum(layer_activation_bytes(config, layer=i, lora=TINY_LAYOUT, seq_len=64, dtype_bytes=2,
                                        attn_impl="eager") for i in range(4))
    assert ddp.activations == 64 * (layers + 4 * 64 + 4 + 8 + 16 * 2) + 2 * 64 * 64 * 2
    assert ddp.logits == 0 and ddp.activations == fsdp.activations


def measured_layer_bytes(model_dir: Path, dtype: torch.dtype, seq_len: int) -> int:
    """Bytes of the tensors one LoRA-wrapped decoder layer of the tiny model saves for the backward pass (tensors
    sharing storage counted once; parameters and the rotary tables excluded)."""
    from transformers import set_seed
    from transformers.masking_utils import create_causal_mask

    from osstune.models.loading import load_model
    from osstune.models.lora import LoraSpec, apply_lora

    loaded = load_model(model_dir, torch_dtype=str(dtype).removeprefix("torch."), device="cpu", attn_impl="eager")
    set_seed(0)
    model = apply_lora(loaded.model, LoraSpec(rank=4, alpha=8, dropout=0.0)).train()
    inner = model.base_model.model.model
    x = torch.randn(1, seq_len, 64, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq_len)[None]
    rotary = inner.rotary_emb(x, positions)
    mask = create_causal_mask(config=inner.config, inputs_embeds=x, attention_mask=torch.ones(1, seq_len).long(),
                              cache=None, position_ids=positions)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *rotary)}
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # as the Trainer runs bf16
        return saved_storage_bytes(
            lambda: inner.layers[1](x, attention_mask=mask, position_ids=positions, position_embeddings=rotary), skip)


def saved_storage_bytes(run: Callable[[], object], skip: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``run`` runs (tensors sharing a
    storage counted once), leaving out the storages whose data pointers are in ``skip``."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_model_matches_what_autograd_saves(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    seq_len = 256
    measured = measured_layer_bytes(tiny_model_dir, dtype, seq_len)
    estimated = seq_len * layer_activation_bytes(config, layer=1, lora=TINY_LAYOUT, seq_len=seq_len,
                                                 dtype_bytes=dtype.itemsize, attn_impl="eager")
    assert abs(estimated - measured) / measured < 0.02, (estimated, measured)


def test_steps_per_epoch_follows_the_trainer() -> None:
    assert steps_per_epoch(24, 2, 2, 1) == 6
    assert steps_per_epoch(23, 2, 2, 2) == 3  # 12 batches -> 6 per process -> 3 steps
    assert steps_per_epoch(25, 2, 2, 1) == 7  # 13 batches: the last process's 7th batch is padded
    assert steps_per_epoch(100, 1, 8, 16) == 1  # a partial accumulation group still makes a step
    assert steps_per_epoch(5, 4, 4, 1) == 1


def test_engine_of_the_flags() -> None:
    assert training_engine(TrainArgs()) == "ddp"
    assert training_engine(TrainArgs(deepspeed="zero2")) == "zero2"
    assert training_engine(TrainArgs(deepspeed="zero3")) == "zero3"
    assert training_engine(TrainArgs(deepspeed="zero3_offload")) == "zero3_offload"
    assert training_engine(TrainArgs(fsdp="full_shard auto_wrap")) == "fsdp"
    assert training_engine(TrainArgs(fsdp="full_shard offload")) == "fsdp_offload"


def test_every_shipped_deepspeed_preset_is_a_valid_config() -> None:
    from importlib.resources import files

    from osstune.train.sft import DEEPSPEED_PRESETS, deepspeed_stage

    shipped = sorted(p.name for p in (files("osstune") / "resources" / "deepspeed").iterdir())
    assert shipped == sorted(f"{name}.json" for name in DEEPSPEED_PRESETS)
    assert [deepspeed_stage(name) for name in DEEPSPEED_PRESETS] == [2, 3, 3]
    for name in DEEPSPEED_PRESETS:
        config = json.loads((files("osstune") / "resources" / "deepspeed" / f"{name}.json").read_text())
        # Batch sizes, accumulation, clipping and precision come from the Trainer's flags.
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
        assert config["bf16"] == {"enabled": "auto"}


def test_cli_dry_run_prints_the_plan_and_trains_nothing(weightless_dir: Path, data_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPROC_PER_NODE", "2")  # counted as the world size, never launched
    code = main(["sft", "--model", str(weightless_dir), "--dataset", str(data_file), "--dry_run", "true",
                 "--torch_dtype", "float32", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                 "3", "--split_dataset_ratio", "0", "--output_dir", str(tmp_path / "out"), "--deepspeed", "zero3",
                 "--current_date", DATE])
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "effective batch │ 12 = 2 per device x 3 accumulation x 2 processes" in out
    assert "steps per epoch │ 2" in out and "2 (zero3)" in out
    assert "gathered layers" in out and "total" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("expert_lora", [True, False])
def test_expert_activation_bytes_are_what_the_fused_path_saves(expert_lora: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The router and experts of one layer on the grouped path (as on CUDA), bf16: the saved bytes grow by exactly
    the estimate per token; what does not grow with the tokens is the adapter's bf16 copy."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    import osstune.models.gpt_oss.experts as experts_module
    from osstune.models.lora import LoraSpec, apply_lora
    from osstune.models.memory import _experts_bytes

    monkeypatch.setattr(experts_module, "grouped_mm_applies", lambda *args: True)
    config = GptOssConfig(num_hidden_layers=1, hidden_size=256, intermediate_size=256, head_dim=32,
                          num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=512, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    apply_lora(model, LoraSpec(rank=4, alpha=8, dropout=0.0, target_experts="all" if expert_lora else "none"))
    mlp = model.model.layers[0].mlp
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}

    def saved_bytes(tokens: int) -> int:
        x = torch.randn(1, tokens, 256, dtype=torch.bfloat16, requires_grad=True)
        return saved_storage_bytes(lambda: mlp(x), weights)

    per_token = (saved_bytes(192) - saved_bytes(64)) / 128
    assert per_token == _experts_bytes(config.to_dict(), expert_lora, False, 4, 2)
