"""bench/scale_out.py: the seed command it runs, the data it builds, how it runs and reads each engine."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from osstune.cli import build_parser
from osstune.config import parse_flags
from osstune.train.sft import SftConfig

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "scale_out.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    """The benchmark script, imported as a module."""
    spec = importlib.util.spec_from_file_location("scale_out", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_out"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def sft_config(argv: list[str]) -> SftConfig:
    """Parse ``osstune sft`` flags as the CLI does."""
    _, parsers = build_parser("sft")
    _, parser, groups = parsers["sft"]
    return SftConfig.from_groups(parse_flags("sft", argv, groups, parser))


def test_seed_command_is_read_from_the_seed_script(bench: Any) -> None:
    env, flags = bench.seed_command()
    assert env == {"NPROC_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert flags[:6] == ["--deepspeed", "zero3", "--model", "$MODEL", "--dataset", "$DATA"]
    assert flags[-2:] == ["--swanlab_project", "swift-robot"]
    assert bench.seed_value(flags, "--gradient_accumulation_steps") == "16"
    with pytest.raises(KeyError):
        bench.seed_value(flags, "--fsdp")


@pytest.mark.parametrize(("engine", "deepspeed", "fsdp"),
                         [("none", None, None), ("zero3", "zero3", None), ("fsdp", None, "full_shard")])
def test_each_engine_runs_the_seed_flags_with_only_the_documented_changes(
        bench: Any, engine: str, deepspeed: str | None, fsdp: str | None) -> None:
    _, flags = bench.seed_command()
    overrides = bench.run_overrides(model="/m", dataset="/d.json", output_dir="/o", steps=4, tiny=False)
    argv = bench.engine_argv(flags, engine, overrides)
    assert argv.count("--deepspeed") == (deepspeed is not None) and "swanlab" not in argv
    cfg = sft_config(argv)
    assert (cfg.train.deepspeed, cfg.train.fsdp) == (deepspeed, fsdp)
    assert (cfg.load.model, cfg.data.dataset, cfg.train.output_dir) == ("/m", ["/d.json"], "/o")
    assert (cfg.train.max_steps, cfg.train.save_strategy, cfg.train.logging_steps, cfg.track.report_to) == (
        4, "no", 1, ["none"])
    seed = sft_config([a.replace("$MODEL", "/m").replace("$DATA", "/d.json") for a in flags])
    for changed in ("train", "track", "load", "data"):
        kept = {k: v for k, v in vars(getattr(cfg, changed)).items()
                if k not in ("deepspeed", "fsdp", "max_steps", "save_strategy", "logging_steps", "report_to",
                             "output_dir", "model", "dataset")}
        assert kept == {k: v for k, v in vars(getattr(seed, changed)).items() if k in kept}, changed
    assert cfg.lora == seed.lora and cfg.template == seed.template
    assert (cfg.train.gradient_accumulation_steps, cfg.data.max_length, cfg.train.use_liger_kernel) == (16, 8192, True)
    tiny = bench.engine_argv(flags, "none", bench.run_overrides(model="/m", dataset="/d", output_dir="/o", steps=2,
                                                               tiny=True))
    assert sft_config(tiny).load.torch_dtype == "float32"


def test_dataset_samples_follow_their_target_lengths(bench: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    from osstune.data.sources import load_records, parse_dataset_spec

    exchanges = bench.demo_exchanges(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")))
    assert len(exchanges) == 265  # 245 conversations, 20 of them with two turns
    assert exchanges[0].question == "What's 81 / 9?" and exchanges[0].answer == "81 / 9 = 9, nya~"
    targets = bench.sample_targets(40, 300, 32, 1000, seed=0)
    assert targets == bench.sample_targets(40, 300, 32, 1000, seed=0) and min(targets) >= 32 and max(targets) <= 1000
    described = bench.build_dataset(tmp_path / "train.json", exchanges, targets, seed=0)
    rows = json.loads((tmp_path / "train.json").read_text())
    assert len(rows) == described["samples"] == 40
    by_question = {e.question: e for e in exchanges}
    for row, target in zip(rows, targets):
        user, assistant = row["messages"]
        picked = [by_question[q] for q in user["content"].split("\n\n")]
        total = sum(e.tokens for e in picked)
        assert total >= target > total - picked[-1].tokens  # stops at the first exchange that reaches the target
        assert assistant["content"] == "\n\n".join(e.answer for e in picked)
        assert assistant["thinking"] == " ".join(e.thinking for e in picked)
    assert described["text_tokens"]["total"] == sum(
        sum(by_question[q].tokens for q in row["messages"][0]["content"].split("\n\n")) for row in rows)
    records = load_records(parse_dataset_spec(str(tmp_path / "train.json")), seed=0)
    assert len(records) == 40


def test_summary_leaves_out_the_first_step(bench: Any, tmp_path: Path) -> None:
    records = [
        {"step": 1, "loss": 12.5, "tokens_per_s": 100.0, "memory_gib": 40.0, "elapsed_s": 10.0},
        {"step": 2, "loss": 12.25, "tokens_per_s": 500.0, "memory_gib": 44.5, "elapsed_s": 12.0},
        {"step": 3, "loss": 12.0, "tokens_per_s": 400.0, "memory_gib": 44.0, "elapsed_s": 15.0},
        {"step": 3, "train_runtime_s": 15.1, "train_loss": 12.25, "elapsed_s": 15.2},
    ]
    log = "memory: weights need ~39 GiB\nloaded /m: dtype bfloat16, attn flex_attention, 20.91B params, cuda:0, 41.3s\n"
    summary = bench.summarize(records, log, tmp_path)
    assert summary.steps == 3 and summary.measured_steps == [2, 3]
    assert summary.tokens_per_s == 440.0  # (500 * 2 + 400 * 3) tokens in 5 s
    assert (summary.s_per_step, summary.tokens_per_step, summary.first_step_s) == (2.5, 1100.0, 10.0)
    assert (summary.peak_alloc_gib, summary.load_s) == (44.5, 41.3)
    assert summary.losses == [[1, 12.5], [2, 12.25], [3, 12.0]]
    one = bench.summarize(records[:1], "", None)
    assert (one.tokens_per_s, one.s_per_step, one.measured_steps, one.load_s) == (100.0, 10.0, [1], None)
    assert bench.summarize([], "", None).tokens_per_s is None


def test_run_command_logs_and_stops_at_the_time_limit(bench: Any, tmp_path: Path) -> None:
    env, shown = bench.child_env(1, True, {})
    assert shown == {"NPROC_PER_NODE": "1"} and env["PYTHONPATH"].split(":")[0] == str(bench.SRC)
    done = bench.run_command([sys.executable, "-c", "print('hello')"], env, shown, tmp_path / "a.log", 30)
    assert done.returncode == 0 and done.command.startswith("NPROC_PER_NODE=1 ")
    assert (tmp_path / "a.log").read_text().splitlines()[1:] == ["hello"]
    started = time.perf_counter()
    stuck = bench.run_command([sys.executable, "-c", "import time; time.sleep(60)"], env, shown, tmp_path / "b.log",
                              1)
    assert stuck.returncode is None and time.perf_counter() - started < 10
    assert "time limit of 1s reached" in (tmp_path / "b.log").read_text()


def test_single_process_deepspeed_retries_with_the_launcher_environment(bench: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(argv: list[str], env: dict[str, str], shown: dict[str, str], log: Path, timeout_s: float) -> Any:
        calls.append(dict(shown))
        log.parent.mkdir(parents=True, exist_ok=True)
        if "RANK" not in shown:
            log.write_text("Not using the DeepSpeed or dist launchers, attempting to detect MPI environment...\n"
                           "ModuleNotFoundError: No module named 'mpi4py'\n")
            return bench.Attempt("cmd", 1, 1.0, str(log), None, 1.0)
        run_dir = tmp_path / "out" / "v0-20260101-000000"
        run_dir.mkdir(parents=True)
        (run_dir / "logging.jsonl").write_text(
            json.dumps({"step": 1, "loss": 12.0, "tokens_per_s": 10.0, "memory_gib": 1.0, "elapsed_s": 2.0}) + "\n")
        log.write_text("ok\n")
        return bench.Attempt("cmd", 0, 3.0, str(log), None, 1.0)

    monkeypatch.setattr(bench, "run_command", fake_run)
    argv = ["--deepspeed", "zero3"]
    result = bench.run_engine("zero3", 1, argv, tiny=False, work=tmp_path, output_dir=tmp_path / "out",
                              timeout_s=5, launcher="auto")
    assert result.status == "ok" and len(result.attempts) == 2
    assert [c.get("WORLD_SIZE") for c in calls] == [None, "1"] and calls[1]["LOCAL_RANK"] == "0"
    assert "MPI discovery" in result.notes[0]
    calls.clear()
    never = bench.run_engine("zero3", 1, argv, tiny=False, work=tmp_path, output_dir=tmp_path / "out",
                             timeout_s=5, launcher="never")
    assert never.status == "failed (exit 1)" and len(calls) == 1 and "mpi4py" in never.tail


def test_table_and_loss_agreement(bench: Any) -> None:
    def result(engine: str, losses: list[list[float]], tokens_per_s: float | None, status: str = "ok") -> Any:
        summary = bench.Summary(steps=len(losses), tokens_per_s=tokens_per_s, s_per_step=2.0, measured_steps=[2],
                                first_step_s=30.0, tokens_per_step=9000.0, peak_alloc_gib=45.25, losses=losses,
                                load_s=12.0, run_dir=None)
        attempt = bench.Attempt("cmd", 0, 60.0, "x.log", 50.5, 44.0)
        return bench.EngineResult(engine, 2, status, [attempt], summary)

    results = [result("none", [[1, 12.5], [2, 12.0]], 9000.0), result("zero3", [[1, 12.51], [2, 11.98]], 4500.0),
               result("fsdp", [], None, "failed (exit 1)")]
    assert bench.loss_agreement(results) == [
        "loss zero3 vs none: step 1 differs by +0.0100, at most 0.0200 over 2 common steps"]
    lines = bench.table(results).splitlines()
    assert lines[2] == ("| none | 2 | ok | 2 | 9,000 | 4,500 | 2.00 | 9,000 | 30.0 | 12.0 | 45.2 | 50.5 | 44.0 | "
                        "12.5000 -> 12.0000 |")
    assert lines[4].startswith("| fsdp | 2 | failed (exit 1) | 0 | - | - |") and lines[4].endswith("| - |")


def test_install_vocabulary_checks_the_file(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    bpe_openai = pytest.importorskip("bpe_openai")
    shipped = Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz"  # the file carried to the GPU box
    monkeypatch.setenv("OSSTUNE_CACHE", str(tmp_path / "cache"))
    assert bench.install_vocabulary(shipped).startswith("o200k_base vocabulary installed")
    assert bench.install_vocabulary(shipped).startswith("o200k_base vocabulary already at")
    installed = tmp_path / "cache" / "o200k_harmony"
    assert [p.name for p in installed.rglob("*") if p.is_file()] == ["o200k_base.tiktoken"]
    (tmp_path / "other.gz").write_bytes(gzip.compress(b"not it"))
    monkeypatch.setenv("OSSTUNE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(SystemExit, match="not the o200k_base vocabulary"):
        bench.install_vocabulary(tmp_path / "other.gz")
    assert not (tmp_path / "cache2").exists()
