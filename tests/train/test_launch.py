"""The torchrun relaunch: when it happens, the exact command, flags that survive the round trip, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from osstune.cli import build_parser
from osstune.config import TemplateArgs, parse_flags
from osstune.errors import OsstuneError
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.launch import (
    LaunchPlan,
    RankInfo,
    config_flags,
    launch_plan,
    local_main_first,
    rank_info,
    shared_run_dir,
    single_process_rendezvous,
    torchrun_arguments,
    torchrun_command,
)
from osstune.train.run_dir import RUN_NAME
from osstune.train.sft import SftConfig


def test_no_relaunch_without_the_variables_or_inside_a_worker() -> None:
    assert launch_plan({}) is None
    assert launch_plan({"NPROC_PER_NODE": "1"}) is None
    assert launch_plan({"NPROC_PER_NODE": "4", "LOCAL_RANK": "0"}) is None
    assert launch_plan({"NPROC_PER_NODE": "4", "RANK": "3"}) is None


def test_single_node_plan_defaults_to_localhost_and_a_free_port() -> None:
    plan = launch_plan({"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert plan is not None
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.master_addr) == (4, 1, 0, "127.0.0.1")
    assert 0 < plan.master_port < 65536 and plan.world_size == 4
    fixed = launch_plan({"NPROC_PER_NODE": "2", "MASTER_PORT": "29512"})
    assert fixed == LaunchPlan(nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29512)


def test_multi_node_plan_honours_every_variable() -> None:
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600"}
    plan = launch_plan(env)
    assert plan == LaunchPlan(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29600)
    assert plan.world_size == 16
    # NNODES alone launches one process per node.
    only_nodes = launch_plan({"NNODES": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert only_nodes is not None and only_nodes.nproc_per_node == 1 and only_nodes.world_size == 2


@pytest.mark.parametrize(("env", "message"), [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two: expected an integer"),
    ({"NPROC_PER_NODE": "0"}, "both must be at least 1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2"}, "set MASTER_ADDR and MASTER_PORT"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "NODE_RANK=2: must be between 0 and NNODES-1"),
    ({"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, "lists 2 device"),
    ({"NPROC_PER_NODE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000: not a TCP port"),
])
def test_bad_launch_variables_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(OsstuneError, match=message):
        launch_plan(env)


def test_torchrun_command_is_exactly_the_documented_one() -> None:
    plan = LaunchPlan(nproc_per_node=2, nnodes=3, node_rank=1, master_addr="10.1.1.1", master_port=29501)
    arguments = torchrun_arguments(plan, ["--model", "M", "--lora_rank", "8"])
    assert arguments == ["--nproc_per_node", "2", "--nnodes", "3", "--node_rank", "1", "--master_addr", "10.1.1.1",
                         "--master_port", "29501", "-m", "osstune", "sft", "--model", "M", "--lora_rank", "8"]
    assert torchrun_command(arguments, python="/py") == ["/py", "-m", "torch.distributed.run", *arguments]
    from torch.distributed.run import parse_args

    parsed = parse_args(arguments)  # torchrun itself accepts them
    assert (parsed.nproc_per_node, parsed.nnodes, parsed.node_rank, parsed.master_port) == ("2", "3", 1, 29501)
    assert parsed.module and parsed.training_script == "osstune"
    assert parsed.training_script_args == ["sft", "--model", "M", "--lora_rank", "8"]


def _parse_sft(argv: list[str]) -> SftConfig:
    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]
    return SftConfig.from_groups(parse_flags("sft", argv, groups, parser))


def test_flags_rebuilt_from_the_config_parse_back_to_the_same_config(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("learning_rate: 0.0002\nlora_r: 16\nsystem: Be brief.\n")
    cfg = _parse_sft(["--config", str(config_file), "--model", "/m", "--dataset", "a.jsonl", "b.jsonl#5",
                      "--gradient_checkpointing", "false", "--max_length", "none", "--report_to", "swanlab",
                      "tensorboard", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--warmup_ratio", "0.03",
                      "--current_date", "2026-01-01", "--deepspeed", "zero3", "--fsdp", "full_shard auto_wrap"])
    flags = config_flags(cfg.groups())
    assert "--config" not in flags and "--lora_r" not in flags  # resolved: the workers see plain flags
    assert flags[flags.index("--lora_rank") + 1] == "16"
    assert flags[flags.index("--learning_rate") + 1] == "0.0002"
    assert flags[flags.index("--system") + 1] == "Be brief."
    assert flags[flags.index("--dataset"):flags.index("--dataset") + 3] == ["--dataset", "a.jsonl", "b.jsonl#5"]
    assert "--seed" not in flags  # defaults are left out
    assert _parse_sft(flags) == cfg


def test_every_flag_type_survives_the_round_trip() -> None:
    cfg = SftConfig(
        load=LoadArgs(model="/models/x y", torch_dtype="float32", attn_impl="eager"),
        data=SftDataArgs(dataset=["d.jsonl"], val_dataset=["v.jsonl"], seed=3, max_length=512, strict=False,
                         packing=True, split_dataset_ratio=0.25, model_name=["小黄", "Xiao Huang"]),
        template=TemplateArgs(current_date="2025-02-03", reasoning_effort="high", system="Answer\nin German."),
        lora=LoraArgs(lora_rank=2, lora_alpha=4, lora_dropout=0.0, use_rslora=True, target_experts="7,15",
                      target_modules=["q_proj", "v_proj"]),
        train=TrainArgs(output_dir="out dir", num_train_epochs=0.5, max_steps=7, learning_rate=1.25e-05,
                        save_total_limit=2, eval_steps=3, resume_from_checkpoint="out dir/v0/checkpoint-3"),
        track=TrackArgs(report_to=["none"], swanlab_mode="offline"),
    )
    assert _parse_sft(config_flags(cfg.groups())) == cfg


def test_an_emptied_list_cannot_reach_the_workers() -> None:
    with pytest.raises(OsstuneError, match="--target_modules: an empty list"):
        config_flags([LoraArgs(target_modules=[])])


def test_relaunch_returns_the_first_failed_workers_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    ok = tmp_path / "ok.py"
    ok.write_text("import os\nassert os.environ['WORLD_SIZE'] == '2'\n")
    code = ("import sys\nfrom osstune.train.launch import relaunch\n"
            "raise SystemExit(relaunch(['--nproc_per_node', '2', '--master_port', sys.argv[2], sys.argv[1]]))")
    from osstune.train.launch import free_port

    failed = subprocess.run([sys.executable, "-c", code, str(script), str(free_port())], capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 3, failed.stderr[-2000:]
    assert "worker rank 1 failed with exit code 3" in failed.stderr
    assert "Traceback" not in failed.stderr
    passed = subprocess.run([sys.executable, "-c", code, str(ok), str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert passed.returncode == 0, passed.stderr[-2000:]


def test_single_process_rank_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = rank_info()
    assert info == RankInfo(rank=0, local_rank=0, world_size=1) and info.is_main and not info.distributed
    assert rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == RankInfo(3, 1, 4)
    run_dir = shared_run_dir(info, tmp_path / "out")
    assert run_dir.parent == tmp_path / "out" and RUN_NAME.match(run_dir.name) and run_dir.is_dir()
    with local_main_first(info) as first:
        assert first


def test_single_process_rendezvous_completes_only_a_lone_process() -> None:
    env: dict[str, str] = {"MASTER_PORT": "29555"}
    assert single_process_rendezvous(env)
    assert env == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29555"}
    worker = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert not single_process_rendezvous(worker)
    assert worker == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    fresh: dict[str, str] = {}
    assert single_process_rendezvous(fresh) and 0 < int(fresh["MASTER_PORT"]) < 65536
