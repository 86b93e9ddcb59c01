"""`osstune sft` end to end on the tiny gpt-oss: run folder, checkpoints loadable by plain PEFT, resume, signals,
non-finite losses, atomic checkpoints and the seed command's flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Mxfp4Config, Trainer, TrainerCallback

from osstune.cli import main
from osstune.config import TemplateArgs
from osstune.errors import OsstuneError
from osstune.train.args import LoadArgs, LoraArgs, SftDataArgs, TrackArgs, TrainArgs
from osstune.train.run_dir import RUN_NAME, redact
from osstune.train.sft import SftConfig, train

DATE = "2026-01-01"


def config(model: Path, data: Path, out: Path, **train_kw: Any) -> SftConfig:
    lora_dropout = train_kw.pop("lora_dropout", 0.05)
    train_kw.setdefault("learning_rate", 2e-3)
    train_kw.setdefault("logging_steps", 1)
    train_kw.setdefault("per_device_train_batch_size", 4)
    return SftConfig(
        load=LoadArgs(model=str(model), torch_dtype="float32"),
        data=SftDataArgs(dataset=[str(data)], split_dataset_ratio=0.0, seed=7),
        template=TemplateArgs(current_date=DATE),
        lora=LoraArgs(lora_rank=4, lora_alpha=8, lora_dropout=lora_dropout),
        train=TrainArgs(output_dir=str(out), eval_generation_samples=0, **train_kw),
        track=TrackArgs(report_to=["none"]),
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_cli_run_folder_and_plain_peft_loading(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    out = tmp_path / "output"
    code = main(["sft", "--model", str(tiny_model_dir), "--dataset", str(data_file), "--torch_dtype", "float32",
                 "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3",
                 "--per_device_train_batch_size", "4", "--split_dataset_ratio", "0.1", "--eval_steps", "2",
                 "--output_dir", str(out), "--report_to", "none", "--current_date", DATE])
    assert code == 0
    (run_dir,) = list(out.iterdir())
    assert RUN_NAME.match(run_dir.name)
    args = json.loads((run_dir / "args.json").read_text())
    assert args["model"] == str(tiny_model_dir) and args["current_date"] == DATE and args["max_steps"] == 4
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "memory_gib"} <= set(r)
               for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = run_dir / "checkpoint-4"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "args.json"):
        assert (ckpt / name).is_file()
    assert not (run_dir / ".staging").exists()
    assert (run_dir / "report.html").is_file()

    # A plain transformers + PEFT user loads the checkpoint and gets the trained model.
    from peft import PeftModel

    from osstune.models.gpt_oss.moe_lora import enable_grouped_expert_lora

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                    quantization_config=Mxfp4Config(dequantize=True),
                                                    attn_implementation="eager")

    ids = torch.tensor([[5, 17, 99, 250, 7, 42, 1000, 3]])
    plain = PeftModel.from_pretrained(base(), ckpt).eval()
    untrained = base().eval()
    fast = PeftModel.from_pretrained(base(), ckpt).eval()
    assert enable_grouped_expert_lora(fast) > 0
    with torch.no_grad():
        a, b, c = plain(ids).logits, fast(ids).logits, untrained(ids).logits
    assert (a - b).norm() / a.norm() < 1e-5
    assert (a - c).norm() / a.norm() > 1e-4  # the adapter changed the model
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert len(cfg["target_parameters"]) == 2 * 4  # gate_up_proj and down_proj of every layer


def test_resume_follows_the_same_trajectory(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    full = train(config(tiny_model_dir, data_file, tmp_path / "full", max_steps=6, save_steps=3))
    assert full.exit_code == 0

    class StopAt3(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    from osstune.train import sft

    original_fit = sft.fit

    def fit_with_stop(*a: Any, **kw: Any) -> Any:
        return original_fit(*a, callbacks=(StopAt3(),), **kw)

    sft.fit = fit_with_stop
    try:
        first = train(config(tiny_model_dir, data_file, tmp_path / "cut", max_steps=6, save_steps=100))
    finally:
        sft.fit = original_fit
    assert first.exit_code == 143 and first.global_step == 3
    assert first.last_checkpoint is not None and first.last_checkpoint.name == "checkpoint-3"
    second = train(config(tiny_model_dir, data_file, tmp_path / "cut", max_steps=6, save_steps=100,
                          resume_from_checkpoint=str(first.last_checkpoint)))
    assert second.exit_code == 0 and second.global_step == 6
    expected, got = losses(full.run_dir), {**losses(first.run_dir), **losses(second.run_dir)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, tiny_model_dir: Path,
                                                             data_file: Path) -> None:
    class PoisonAt4(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step == 3:  # the 4th step starts
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    from osstune.train import sft

    original_fit = sft.fit
    sft.fit = lambda *a, **kw: original_fit(*a, callbacks=(PoisonAt4(),), **kw)
    try:
        result = train(config(tiny_model_dir, data_file, tmp_path / "nan", max_steps=8, save_steps=1,
                              lora_dropout=0.0))
    finally:
        sft.fit = original_fit
    assert result.exit_code == 1
    assert result.global_step == 4
    names = sorted(p.name for p in result.run_dir.glob("checkpoint-*"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    from safetensors.torch import load_file

    weights = load_file(result.run_dir / "checkpoint-3" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_save_total_limit_keeps_newest(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    result = train(config(tiny_model_dir, data_file, tmp_path / "lim", max_steps=5, save_steps=1,
                          save_total_limit=2))
    assert sorted(p.name for p in result.run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path: Path, tiny_model_dir: Path, data_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = Trainer._save_rng_state

    def flaky(self: Trainer, output_dir: str) -> None:
        if self.state.global_step == 4:
            raise OSError(28, "No space left on device")
        real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", flaky)
    with pytest.raises(OsstuneError, match=r"writing checkpoint-4 failed.*last complete checkpoint is .*checkpoint-2"):
        train(config(tiny_model_dir, data_file, tmp_path / "full-disk", max_steps=6, save_steps=2))
    (run_dir,) = list((tmp_path / "full-disk").iterdir())
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run_dir / ".staging").exists()
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_sigint_saves_then_exits_cleanly(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "osstune", "sft", "--model", str(tiny_model_dir), "--dataset", str(data_file),
         "--torch_dtype", "float32", "--max_steps", "100000", "--save_steps", "100000", "--logging_steps", "1",
         "--output_dir", str(out), "--report_to", "none", "--split_dataset_ratio", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        logs = list(out.glob("v*/logging.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training did not start")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    (run_dir,) = list(out.iterdir())
    ckpts = list(run_dir.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "adapter_model.safetensors").is_file()
    assert "--resume_from_checkpoint" in stdout


SEED_FLAGS = ("--train_type lora --torch_dtype bfloat16 --num_train_epochs 35 --per_device_train_batch_size 1 "
              "--per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 "
              "--target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 "
              "--save_total_limit 2 --logging_steps 5 --max_length 8192 --output_dir output --warmup_ratio 0.05 "
              "--dataloader_num_workers 4 --use_liger_kernel true --load_from_cache_file false "
              "--loss_scale ignore_empty_think --save_strategy epoch --model_author gxb "
              "--model_name gxb-gpt-oss-20b-agent-distill --report_to swanlab --swanlab_project swift-robot").split()


def test_seed_command_flags_parse_with_their_meanings() -> None:
    from osstune.cli import build_parser
    from osstune.config import parse_flags

    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]
    parsed = parse_flags("sft", ["--deepspeed", "zero3", "--model", "DIR", "--dataset", "train.json", *SEED_FLAGS],
                         groups, parser)
    cfg = SftConfig.from_groups(parsed)
    assert cfg.train.deepspeed == "zero3" and cfg.train.gradient_accumulation_steps == 16
    assert cfg.train.save_strategy == "epoch" and cfg.train.save_total_limit == 2
    assert cfg.train.use_liger_kernel is True and cfg.data.load_from_cache_file is False
    assert cfg.template.loss_scale == "ignore_empty_think"
    assert cfg.lora.target_modules == ["all-linear"] and cfg.lora.lora_alpha == 32
    assert cfg.data.model_name == ["gxb-gpt-oss-20b-agent-distill"] and cfg.data.model_author == ["gxb"]
    assert cfg.track.report_to == ["swanlab"] and cfg.track.swanlab_project == "swift-robot"


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, data_file: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    code = main(["sft", "--model", str(tiny_model_dir), "--dataset", str(data_file), "--deepspeed", "zero3",
                 "--output_dir", str(tmp_path)])
    assert code == 2
    assert "DeepSpeed is not installed" in capsys.readouterr().err


def test_trl_aliases_and_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--lr_scheduler_typ", "cosine"]) == 2
    assert "Did you mean --lr_scheduler_type?" in capsys.readouterr().err
    assert main(["sft", "--lazy_tokenize", "true"]) == 2
    assert "ms-swift flag that osstune does not support" in capsys.readouterr().err


def test_redact_removes_secrets() -> None:
    cfg = {"swanlab_api_key": "sk-123", "nested": {"hub_token": "hf_x", "lr": 1}, "model": "m"}
    assert redact(cfg) == {"swanlab_api_key": "***", "nested": {"hub_token": "***", "lr": 1}, "model": "m"}


def test_swanlab_local_run_is_served_by_watch(tmp_path: Path, tiny_model_dir: Path, data_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `osstune sft` run in SwanLab local mode; `osstune watch` serves it and its API has the loss series."""
    import socket
    from contextlib import closing
    from urllib.parse import quote

    from osstune.tracking.watch import api_get, watch

    for key in [k for k in os.environ if k.startswith("SWANLAB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "home" / ".swanlab"))
    out = tmp_path / "out"
    assert main(["sft", "--model", str(tiny_model_dir), "--dataset", str(data_file), "--torch_dtype", "float32",
                 "--max_steps", "4", "--logging_steps", "1", "--save_steps", "4", "--split_dataset_ratio", "0",
                 "--output_dir", str(out), "--report_to", "swanlab", "--swanlab_project", "swift-robot"]) == 0
    (run_dir,) = list(out.iterdir())
    expected = losses(run_dir)
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with watch(run_dir, port=port) as dashboard:
        project = api_get(f"{dashboard.url}/api/v1/project")
        assert project["name"] == "swift-robot"
        (experiment,) = project["experiments"]
        assert experiment["name"] == run_dir.name
        data = api_get(f"{dashboard.url}/api/v1/experiment/{experiment['id']}/tag/{quote('train/loss', safe='')}")
        served = {point["index"]: point["data"] for point in data["list"]}
    assert sorted(served) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert served[step] == pytest.approx(loss, rel=1e-6)
