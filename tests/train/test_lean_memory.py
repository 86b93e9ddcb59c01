"""``osstune sft --offload_embeddings true``, ``--dequant_experts N`` and ``--offload_optimizer true`` on the tiny
gpt-oss: the same losses as without them, where the weights are during training, flag parsing, refused combinations and the dry run."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from osstune.cli import main
from osstune.config import TemplateArgs
from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4_experts import Mxfp4Experts
from osstune.models.memory import format_bytes
from osstune.train import sft
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.dry_run import plan_training
from osstune.train.host_optimizer import BUCKET_BYTES
from osstune.train.sft import SftConfig, train

DATE = "2026-01-01"
EMBEDDING = 3072 * 64  # the tiny gpt-oss's input embedding: vocabulary x hidden
EMBEDDING_NAME = "base_model.model.model.embed_tokens.weight"
FIT = sft.fit


def config(model: Path, data: Path, out: Path, train_kw: dict[str, Any] | None = None, **load_kw: Any) -> SftConfig:
    """Two float32 steps of 4 samples with LoRA r=4 on attention and every expert (``train_kw``: more TrainArgs)."""
    return SftConfig(
        load=LoadArgs(model=str(model), torch_dtype="float32", **load_kw),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(**{"output_dir": str(out), "eval_generation_samples": 0, "learning_rate": 5e-3,
                           "logging_steps": 1, "per_device_train_batch_size": 4, "max_steps": 2,
                           "save_strategy": "no", **(train_kw or {})}),
        track=TrackArgs(report_to=["none"]),
    )


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


class Inspect(TrainerCallback):
    """Records, when training starts, where the embedding is, the DDP-ignored names and the experts' bound."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        embedding = model.get_input_embeddings()
        self.seen = {
            "embedding": type(embedding).__name__,
            "table_device": embedding.weight.device.type,
            "ddp_ignored": list(getattr(model, "_ddp_params_and_buffers_to_ignore", [])),
            "dense_experts": {m.max_dense_experts for m in model.modules() if isinstance(m, Mxfp4Experts)},
            "require_grads_hooks": len(getattr(model.get_base_model(), "_require_grads_hooks", [])),
        }

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        moments = [value for param_state in optimizer.state.values() for key, value in param_state.items()
                   if key.startswith("exp_avg")]
        self.seen["optimizer"] = type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__
        self.seen["moment_devices"] = {tensor.device.type for tensor in moments}
        self.seen["moments"] = len(moments)


def run(cfg: SftConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], dict[str, Any]]:
    """Train and return the logged losses and what ``Inspect`` saw."""
    inspect = Inspect()
    monkeypatch.setattr(sft, "fit", functools.partial(FIT, callbacks=(inspect,)))
    result = train(cfg)
    assert result.exit_code == 0 and result.global_step == 2
    return losses(result.run_dir), inspect.seen


def test_same_losses_with_the_embedding_in_host_ram_and_a_bounded_scratch(
        tmp_path: Path, tiny_model_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, seen = run(config(tiny_model_dir, data_file, tmp_path / "base", expert_weights="mxfp4"), monkeypatch)
    assert seen["embedding"] == "Embedding" and seen["ddp_ignored"] == [] and seen["dense_experts"] == {None}
    assert base[-1] < base[0]  # it learns

    offloaded, seen = run(config(tiny_model_dir, data_file, tmp_path / "offload", expert_weights="mxfp4",
                                 offload_embeddings=True), monkeypatch)
    assert seen["embedding"] == "HostEmbedding" and seen["table_device"] == "cpu"
    assert seen["ddp_ignored"] == [EMBEDDING_NAME] and seen["require_grads_hooks"] == 1
    assert offloaded == pytest.approx(base, rel=1e-6, abs=0)

    bounded, seen = run(config(tiny_model_dir, data_file, tmp_path / "bounded", expert_weights="mxfp4",
                               dequant_experts=2), monkeypatch)
    assert seen["dense_experts"] == {2} and seen["embedding"] == "Embedding"
    assert bounded == pytest.approx(base, rel=1e-6, abs=0)


def test_same_losses_with_the_optimizer_state_in_host_ram(
        tmp_path: Path, tiny_model_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, seen = run(config(tiny_model_dir, data_file, tmp_path / "base"), monkeypatch)
    assert seen["optimizer"] != "HostAdamW"
    offloaded, seen = run(config(tiny_model_dir, data_file, tmp_path / "offload",
                                 train_kw={"offload_optimizer": True}), monkeypatch)
    trainable = 2 * 24  # the tiny model's LoRA A/B tensors: 4 attention projections + 2 expert stacks, 4 layers
    assert seen["optimizer"] == "HostAdamW" and seen["moment_devices"] == {"cpu"} and seen["moments"] == 2 * trainable
    assert offloaded == pytest.approx(base, rel=1e-6, abs=0)


def test_resume_with_the_optimizer_state_in_host_ram(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    """The checkpoint carries the host moments; a resumed run continues on the uninterrupted run's losses."""
    steps = {"offload_optimizer": True, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = train(config(tiny_model_dir, data_file, tmp_path / "full", train_kw=steps))
    assert full.exit_code == 0 and (full.run_dir / "checkpoint-2" / "optimizer.pt").is_file()
    resumed = train(config(tiny_model_dir, data_file, tmp_path / "resumed", train_kw={
        **steps, "resume_from_checkpoint": str(full.run_dir / "checkpoint-2")}))
    assert resumed.exit_code == 0 and resumed.global_step == 4
    expected, got = losses(full.run_dir), losses(resumed.run_dir)
    assert len(expected) == 4 and len(got) == 2
    assert got == pytest.approx(expected[2:], rel=1e-6, abs=0)


def test_flags_parse() -> None:
    from osstune.cli import build_parser
    from osstune.config import parse_flags

    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]
    parsed = SftConfig.from_groups(parse_flags("sft", ["--model", "DIR", "--offload_embeddings", "true",
                                                       "--dequant_experts", "4", "--expert_weights", "mxfp4"],
                                               groups, parser))
    assert parsed.load.offload_embeddings is True and parsed.load.dequant_experts == 4
    defaults = SftConfig.from_groups(parse_flags("sft", ["--model", "DIR"], groups, parser))
    assert defaults.load.offload_embeddings is False and defaults.load.dequant_experts == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--dequant_experts", "4"], "--expert_weights bf16 dequantises them all on load. Add --expert_weights mxfp4"),
    (["--dequant_experts", "-2", "--expert_weights", "mxfp4"], "--dequant_experts -2: give a number of experts"),
    (["--offload_embeddings", "true", "--deepspeed", "zero2"], "cannot be combined with --deepspeed or --fsdp"),
    (["--offload_embeddings", "true", "--fsdp", "full_shard"], "cannot be combined with --deepspeed or --fsdp"),
    (["--offload_optimizer", "true", "--deepspeed", "zero3"], "Use --deepspeed zero3_offload (or zero2_offload)"),
    (["--offload_optimizer", "true", "--fsdp", "full_shard"], "they shard the optimizer state themselves"),
])
def test_refused_before_anything_is_written(flags: list[str], message: str, tmp_path: Path, tiny_model_dir: Path,
                                            data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "output"
    code = main(["sft", "--model", str(tiny_model_dir), "--dataset", str(data_file), "--output_dir", str(out),
                 "--report_to", "none", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_keeps_the_embedding_off_the_gpu_estimate(tiny_model_dir: Path, data_file: Path,
                                                         tmp_path: Path) -> None:
    on_device = plan_training(config(tiny_model_dir, data_file, tmp_path), world_size=1)
    offloaded = plan_training(config(tiny_model_dir, data_file, tmp_path, offload_embeddings=True), world_size=1)
    assert on_device.counts.host == 0 and offloaded.counts.host == EMBEDDING
    assert offloaded.counts.frozen == on_device.counts.frozen - EMBEDDING
    assert offloaded.memory.weights == on_device.memory.weights - EMBEDDING * 4  # float32
    assert offloaded.memory.total == on_device.memory.total - EMBEDDING * 4
    host_state = plan_training(config(tiny_model_dir, data_file, tmp_path, train_kw={"offload_optimizer": True}),
                               world_size=1)
    assert on_device.memory.optimizer == on_device.counts.trainable * 8
    assert host_state.memory.optimizer == min(2 * BUCKET_BYTES, on_device.counts.trainable * 8)
    assert host_state.host_optimizer and not on_device.host_optimizer
    with pytest.raises(OsstuneError, match="Add --expert_weights mxfp4"):
        plan_training(config(tiny_model_dir, data_file, tmp_path, dequant_experts=2), world_size=1)


def test_dry_run_prints_what_stays_in_host_ram(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "240")  # one line per table row
    code = main(["sft", "--model", str(tiny_model_dir), "--dataset", str(data_file), "--output_dir",
                 str(tmp_path / "out"), "--report_to", "none", "--offload_embeddings", "true",
                 "--offload_optimizer", "true", "--dry_run", "true"])
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    plan = plan_training(dataclasses.replace(config(tiny_model_dir, data_file, tmp_path),
                                             lora=LoraArgs()), world_size=1)  # the CLI's default rank
    assert f"host RAM │ input embedding, {EMBEDDING:,} params (0.4 MiB); AdamW moments " \
           f"({format_bytes(plan.counts.trainable * 8)})" in out
    assert not (tmp_path / "out").exists()


def test_one_process_with_several_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer would wrap the model in nn.DataParallel, which cannot replicate a table in host RAM."""
    import torch

    from osstune.train.sft import check_one_gpu_per_process

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(OsstuneError, match=r"this process sees 2 GPUs .*\(CUDA_VISIBLE_DEVICES=0\).*NPROC_PER_NODE=N"):
        check_one_gpu_per_process(world_size=1)
    check_one_gpu_per_process(world_size=2)  # one GPU per process under DDP
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_one_gpu_per_process(world_size=1)
