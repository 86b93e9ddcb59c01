"""`osstune report`: PNG charts, report.html and the terminal summary from a hand-written run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osstune.errors import OsstuneError
from osstune.tracking.report import ReportArgs, read_log, run, summary_lines, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHART_FILES = ["report_loss.png", "report_lr.png", "report_grad_norm.png", "report_tokens_per_s.png",
               "report_memory.png"]
SECRET = "hf_do_not_show"


def train_line(step: int, *, memory: bool = True) -> dict:
    line = {"step": step, "epoch": step / 10, "loss": round(2.0 - 0.11 * step, 4), "lr": 1e-4 * step / 10,
            "grad_norm": 1.0 / step, "tokens_per_s": 1000.0 + 10 * step, "trained_tokens": 512 * step,
            "elapsed_s": 2.0 * step}
    if memory:
        line["memory_gib"] = 40.0 + step / 10
    return line


def make_run(run_dir: Path, *, memory: bool = True, extras: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    lines = [train_line(s, memory=memory) for s in range(1, 11)]
    lines.insert(5, {"step": 5, "epoch": 0.5, "eval_loss": 1.5, "eval_ppl": 4.4817, "elapsed_s": 11.0})
    lines.append({"step": 10, "epoch": 1.0, "eval_loss": 1.3, "eval_ppl": 3.6693, "elapsed_s": 21.0})
    lines.append({"step": 10, "train_runtime_s": 3725.0, "train_loss": 1.4})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 11, "lo'  # a line being written
    (run_dir / "logging.jsonl").write_text(text)
    if extras:
        (run_dir / "args.json").write_text(json.dumps({
            "model": {"model": "openai/gpt-oss-20b"}, "train": {"learning_rate": 1e-4, "lora_rank": 8},
            "data": {"dataset": ["train.jsonl", "extra.jsonl"]}, "hub_token": SECRET}))
        (run_dir / "samples.jsonl").write_text(
            json.dumps({"step": 5, "prompt": "Who are you?", "response": "I am <b>gpt-oss</b>."}) + "\n"
            + json.dumps({"step": 10, "prompt": "2+2?", "response": "4"}) + "\n")
    return run_dir


def test_report_files(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "v0-20250101-000000")
    report = write_report(run_dir)
    assert report == run_dir / "report.html"
    page = report.read_text()
    for name in CHART_FILES:
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 10_000, name
        assert f'href="{name}"' in page
    assert page.count("data:image/png;base64,") == len(CHART_FILES)
    assert "<title>osstune run report: v0-20250101-000000</title>" in page
    assert "<tr><th>final train loss</th><td>0.9000 at step 10</td></tr>" in page
    assert "<tr><th>best eval loss</th><td>1.3000 at step 10 (ppl 3.67)</td></tr>" in page
    assert "<tr><th>model</th><td>openai/gpt-oss-20b</td></tr>" in page
    assert "<tr><th>dataset</th><td>train.jsonl, extra.jsonl</td></tr>" in page
    assert "I am &lt;b&gt;gpt-oss&lt;/b&gt;." in page
    assert SECRET not in page


def test_summary_lines(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "v0-20250101-000000")
    before = summary_lines(run_dir)
    assert before[-1] == f"report: not written yet (osstune report {run_dir})"
    write_report(run_dir)
    assert summary_lines(run_dir) == [
        "steps: 10 (epoch 1.00)",
        "final train loss: 0.9000 at step 10",
        "best eval loss: 1.3000 at step 10 (ppl 3.67)",
        "final eval loss: 1.3000",
        "tokens/s (median): 1,055",
        "trained tokens: 5,120",
        "peak memory: 41.0 GiB",
        "train runtime: 1:02:05",
        f"report: {run_dir / 'report.html'}",
    ]


def test_cpu_run_without_memory_or_extras(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", memory=False, extras=False)
    write_report(run_dir)
    assert not (run_dir / "report_memory.png").exists()
    assert (run_dir / "report_loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "peak memory: not recorded" in summary_lines(run_dir)
    page = (run_dir / "report.html").read_text()
    assert "Sample generations" not in page and "Configuration" not in page


def test_read_log_splits_lines(tmp_path: Path) -> None:
    log = read_log(make_run(tmp_path / "run"))
    assert [r["step"] for r in log.train] == list(range(1, 11))
    assert [r["eval_loss"] for r in log.eval] == [1.5, 1.3]
    assert log.final == {"step": 10, "train_runtime_s": 3725.0, "train_loss": 1.4}
    assert log.series("memory_gib", "train")[1][-1] == 41.0


def test_missing_log_names_the_runs_found(tmp_path: Path) -> None:
    make_run(tmp_path / "v0-20250101-000000", extras=False)
    with pytest.raises(OsstuneError, match="holds runs: v0-20250101-000000"):
        write_report(tmp_path)


def test_bad_line_is_located(tmp_path: Path) -> None:
    (tmp_path / "logging.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(OsstuneError, match=r"logging.jsonl, line 2: not valid JSON"):
        summary_lines(tmp_path)


def test_run_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path / "run")
    assert run({ReportArgs: ReportArgs(run_dir=str(run_dir))}) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "final train loss: 0.9000 at step 10"
    assert out[-1] == f"report: {run_dir / 'report.html'}"
