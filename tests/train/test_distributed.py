"""Training in several processes on CPU (gloo), on the tiny gpt-oss in float32 without dropout.

- DDP: ``NPROC_PER_NODE=2 osstune sft`` with 2 rows per process follows the single-process trajectory with 4 rows
  per step (relative tolerance 1e-5 on every logged loss; measured differences are about 1e-7, from summation
  order). SIGTERM to the launcher stops both ranks after the same step with a checkpoint; resuming it under two
  processes continues the same trajectory; the adapter files match a single process's in keys, shapes and dtypes.
- FSDP2: the Hugging Face Trainer cannot run FSDP on CPU (accelerate 1.15 enables it only for GPU-like devices and
  would silently run DDP), so this file runs the wrapping accelerate applies under the Trainer
  (``fsdp2_prepare_model`` with the plugin built from ``--fsdp full_shard``) in two processes of its own, with the
  Trainer's gradient checkpointing: the sharded expert LoRA follows the single-process losses and trained weights,
  and the adapter gathered for saving equals the single-process one.

Run as a script under torchrun, this file is the FSDP2 worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from osstune.config import TemplateArgs
from osstune.errors import OsstuneError
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.dry_run import steps_per_epoch
from osstune.train.launch import RankInfo, free_port
from osstune.train.sft import (
    SftConfig,
    _check_flags,
    fsdp_config,
    load_device,
    train,
    training_arguments,
    zero3_external_parameters,
)

DATE = "2026-01-01"
STEPS = 16
"""Optimizer steps of the DDP runs: enough that SIGTERM, sent after step 2, lands well before the end."""

FSDP_STEPS = 3
LOSS_RTOL = 1e-5


def flags(model: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--torch_dtype", "float32", "--max_steps", str(STEPS),
            "--save_steps", "1000", "--logging_steps", "1", "--learning_rate", "2e-3", "--lora_rank", "4",
            "--lora_alpha", "8", "--lora_dropout", "0", "--seed", "7", "--split_dataset_ratio", "0",
            "--per_device_train_batch_size", str(batch), "--output_dir", str(out), "--report_to", "none",
            "--current_date", DATE, *extra]


def launch(args: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    return subprocess.Popen([sys.executable, "-m", "osstune", "sft", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: only rank 0 may write logging.jsonl"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_layout(checkpoint: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(checkpoint / "adapter_model.safetensors", framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def adapter_config(checkpoint: Path) -> dict[str, Any]:
    """``adapter_config.json`` with ``target_modules`` as a set (PEFT writes a set, in no fixed order)."""
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    return {**config, "target_modules": set(config["target_modules"])}


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_ddp_follows_one_process_stops_on_sigterm_and_resumes(tmp_path: Path, tiny_model_dir: Path,
                                                              data_file: Path) -> None:
    one = train(SftConfig(
        load=LoadArgs(model=str(tiny_model_dir), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data_file)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        train=TrainArgs(output_dir=str(tmp_path / "one"), max_steps=STEPS, save_steps=STEPS, logging_steps=1,
                        learning_rate=2e-3, per_device_train_batch_size=4, eval_generation_samples=0),
        track=TrackArgs(report_to=["none"])))
    expected = losses(one.run_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))

    out = tmp_path / "two"
    proc = launch(flags(tiny_model_dir, data_file, out, 2))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        logs = list(out.glob("v*/logging.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert processes_mentioning(str(out)) == []  # every rank has exited

    (run_dir,) = list(out.iterdir())  # one run folder for both ranks
    assert json.loads((run_dir / "args.json").read_text())["world_size"] == 2
    (checkpoint,) = list(run_dir.glob("checkpoint-*"))
    stopped = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped < STEPS
    assert "--resume_from_checkpoint" in stdout and checkpoint.name in stdout
    got = losses(run_dir)
    assert sorted(got) == list(range(1, stopped + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=LOSS_RTOL), step
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (run_dir / ".staging").exists()
    single = one.run_dir / f"checkpoint-{STEPS}"
    assert adapter_layout(checkpoint) == adapter_layout(single)
    assert adapter_config(checkpoint) == adapter_config(single)

    resumed = launch(flags(tiny_model_dir, data_file, tmp_path / "resumed", 2,
                           "--resume_from_checkpoint", str(checkpoint)))
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-3000:]
    (resumed_dir,) = list((tmp_path / "resumed").iterdir())
    got = losses(resumed_dir)
    assert sorted(got) == list(range(stopped + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=LOSS_RTOL), step
    # The Trainer's epoch counter agrees with the dry run's steps per epoch (24 rows, 2 per process, 2 processes).
    epochs = {r["step"]: r["epoch"] for r in map(json.loads, (resumed_dir / "logging.jsonl").read_text().splitlines())
              if "loss" in r}
    assert epochs[12] == pytest.approx(12 / steps_per_epoch(24, 2, 2, 1)) == 2.0


def fsdp2_worker(model_dir: Path, out: Path) -> None:
    """Train the tiny model's LoRA sharded as accelerate's FSDP2 does under the Trainer; rank 0 saves the adapter
    and the losses (mean over ranks) to ``out``."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    from osstune.train.trainer import gathered_trainable_state_dict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    targs = training_arguments(TrainArgs(output_dir=str(out), fsdp="full_shard"), 7, out, False, False, False)
    plugin = FullyShardedDataParallelPlugin(**targs.fsdp_plugin_args)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        is_main_process=rank == 0, device=torch.device("cpu"))
    model, batch = reference_model(model_dir)
    model = fsdp2_prepare_model(accelerator, model)
    assert sum(isinstance(m, FSDPModule) for m in model.modules()) == 4 + 3  # layers, embedding, tail, root
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mine = batch.chunk(world)[rank]
    history = []
    for _ in range(FSDP_STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        history.append(mean.item() / world)
    state = gathered_trainable_state_dict(model)
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=state)
        (out / "losses.json").write_text(json.dumps(history))
    dist.destroy_process_group()


def reference_model(model_dir: Path) -> tuple[Any, torch.Tensor]:
    """The tiny model with a fresh LoRA (seeded) and gradient checkpointing as the Trainer sets them, and a batch of
    4 equal-length sequences (so the mean over ranks of per-rank mean losses is the full-batch mean loss)."""
    from transformers import set_seed

    from osstune.models.loading import load_model
    from osstune.models.lora import LoraSpec, apply_lora

    loaded = load_model(model_dir, torch_dtype="float32", device="cpu")
    loaded.model.config.use_cache = False
    set_seed(7)
    model = apply_lora(loaded.model, LoraSpec(rank=4, alpha=8, dropout=0.0))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    batch = torch.randint(0, loaded.config["vocab_size"] - 64, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, batch


def test_fsdp2_sharded_expert_lora_matches_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), __file__, str(tiny_model_dir), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    model, batch = reference_model(tiny_model_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = []
    for _ in range(FSDP_STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(expected, rel=LOSS_RTOL)

    model.save_pretrained(tmp_path / "single")
    assert adapter_layout(tmp_path / "adapter") == adapter_layout(tmp_path / "single")
    assert len(adapter_layout(tmp_path / "single")) == 4 * (4 + 2) * 2  # q/k/v/o and both expert stacks, A and B
    from safetensors.torch import load_file

    sharded, single = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(
        tmp_path / "single" / "adapter_model.safetensors")
    for key, value in single.items():
        # AdamW divides by the root of the squared gradient: where a gradient is near zero, summation-order noise
        # moves the update by a few 1e-5; 1e-4 is 1% of one step at this learning rate.
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-4)


def test_fsdp_flag_spellings() -> None:
    full = {"version": 2, "reshard_after_forward": True, "cpu_offload": False,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}
    assert fsdp_config("full_shard auto_wrap") == fsdp_config("true") == fsdp_config("full_shard") == full
    assert fsdp_config("shard_grad_op auto_wrap offload") == {**full, "reshard_after_forward": False,
                                                              "cpu_offload": True}
    assert fsdp_config(None) is None and fsdp_config("false") is None and fsdp_config("") is None
    with pytest.raises(OsstuneError, match="hybrid_shard is not supported"):
        fsdp_config("hybrid_shard auto_wrap")
    with pytest.raises(OsstuneError, match="exclude each other"):
        fsdp_config("full_shard shard_grad_op")


def test_fsdp_json_file(tmp_path: Path) -> None:
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_reshard_after_forward": False, "fsdp_cpu_offload": True}))
    assert fsdp_config(str(path)) == {"reshard_after_forward": False, "cpu_offload": True, "version": 2}
    path.write_text(json.dumps({"activation_checkpointing": True}))
    with pytest.raises(OsstuneError, match="PEFT does not see through"):
        fsdp_config(str(path))
    with pytest.raises(OsstuneError, match="cannot read it"):
        fsdp_config(str(tmp_path / "missing.json"))


def test_fsdp_reaches_the_trainer_as_fsdp2_with_layer_wrapping(tmp_path: Path) -> None:
    targs = training_arguments(TrainArgs(output_dir=str(tmp_path), fsdp="full_shard auto_wrap"), 7, tmp_path, False,
                               False, False)
    assert targs.fsdp_plugin_args == {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                      "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT",
                                      "reshard_after_forward": True}
    assert targs.activation_checkpointing is True and targs.ddp_find_unused_parameters is False
    plain = training_arguments(TrainArgs(output_dir=str(tmp_path)), 7, tmp_path, False, False, False)
    assert plain.fsdp_plugin_args is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_fsdp_without_gpus_is_refused_not_silently_ddp(tiny_model_dir: Path, data_file: Path) -> None:
    cfg = SftConfig(load=LoadArgs(model=str(tiny_model_dir)), data=SftDataArgs(dataset=[str(data_file)]),
                    template=TemplateArgs(), lora=LoraArgs(), train=TrainArgs(fsdp="full_shard"), track=TrackArgs())
    with pytest.raises(OsstuneError, match="silently fall back to DDP"):
        _check_flags(cfg, world_size=2)
    both = SftConfig(load=cfg.load, data=cfg.data, template=cfg.template, lora=cfg.lora,
                     train=TrainArgs(fsdp="full_shard", deepspeed="zero3"), track=cfg.track)
    with pytest.raises(OsstuneError, match="choose one"):
        _check_flags(both, world_size=2)


def test_where_each_process_loads_the_model() -> None:
    single, worker = RankInfo(), RankInfo(rank=1, local_rank=1, world_size=2)
    assert load_device(TrainArgs(), single) is None
    assert load_device(TrainArgs(), worker) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    assert load_device(TrainArgs(deepspeed="zero2"), worker) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    assert load_device(TrainArgs(deepspeed="zero3"), worker) == "cpu"  # DeepSpeed partitions it
    assert load_device(TrainArgs(deepspeed="zero3_offload"), worker) == "cpu"
    assert load_device(TrainArgs(fsdp="full_shard"), worker) == "cpu"  # fully_shard moves the shards


def test_zero3_gathers_what_the_parameter_lora_forward_reads(tiny_model_dir: Path) -> None:
    from peft.tuners.lora.layer import ParamWrapper

    from osstune.models.gpt_oss.moe_lora import GroupedExpertLoraForward
    from osstune.models.loading import load_model
    from osstune.models.lora import LoraSpec, apply_lora

    model = apply_lora(load_model(tiny_model_dir, torch_dtype="float32", device="cpu").model,
                       LoraSpec(rank=4, alpha=8, dropout=0.0))
    pairs = zero3_external_parameters(model)
    owners = {id(module): module for module, _ in pairs}
    assert len(owners) == 4  # the outermost expert wrapper of each layer: the one whose forward runs
    assert all(isinstance(m, ParamWrapper) and isinstance(m.__dict__.get("forward"), GroupedExpertLoraForward)
               for m in owners.values())
    names = {name: p for name, p in model.named_parameters()}
    registered = {id(p) for _, p in pairs}
    expected = {n for n in names if ".mlp.experts." in n}  # expert stacks, biases and both adapters, all layers
    assert len(expected) == 4 * (4 + 4)
    assert {n for n, p in names.items() if id(p) in registered} == expected


if __name__ == "__main__":
    fsdp2_worker(Path(sys.argv[1]), Path(sys.argv[2]))
