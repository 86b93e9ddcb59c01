"""`osstune data` end to end: statistics, preview, JSONL export, and every bad-input case (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from osstune.chat.options import IGNORE_INDEX
from osstune.cli import main

DATE = "2026-01-01"


def rows_file(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def good(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Q{i}"},
                         {"role": "assistant", "content": f"<think>\nreason {i}\n</think>\n\nA{i}"}]}


def test_end_to_end_output_and_preview(tmp_path: Path, gpt_oss_tokenizer_dir: Path, o200k_tokenizer: Any,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    msgs = rows_file(tmp_path / "chat.jsonl", [good(i) for i in range(3)])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"}]))
    out = tmp_path / "out" / "samples.jsonl"
    code = main(["data", "--model", str(gpt_oss_tokenizer_dir), "--dataset", str(msgs), str(alpaca),
                 "--output", str(out), "--preview", "1", "--current_date", DATE])
    assert code == 0
    printed = capsys.readouterr().out
    assert "messages" in printed and "alpaca" in printed and "trained tokens" in printed
    assert "<|start|>assistant<|channel|>analysis<|message|>reason 0<|end|>" in printed  # the preview
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["source"], r["index"]) for r in lines] == [(str(msgs), 0), (str(msgs), 1), (str(msgs), 2),
                                                          (str(alpaca), 0)]
    assert all(set(r) == {"source", "index", "input_ids", "labels"} for r in lines)
    first = lines[0]
    trained = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert o200k_tokenizer.decode(trained) == (
        "<|channel|>analysis<|message|>reason 0<|end|><|start|>assistant<|channel|>final<|message|>A0<|return|>")
    last = o200k_tokenizer.decode(lines[3]["input_ids"])
    assert "<|start|>user<|message|>Translate\nchat<|end|>" in last
    assert f"Current date: {DATE}" in last


def test_reads_no_weights(tmp_path: Path, gpt_oss_tokenizer_dir: Path) -> None:
    """A corrupt weights file next to the tokenizer is never opened."""
    model = tmp_path / "model"
    model.mkdir()
    for f in gpt_oss_tokenizer_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    data = rows_file(tmp_path / "d.jsonl", [good(0)])
    assert main(["data", "--model", str(model), "--dataset", str(data)]) == 0


BAD_CASES = {
    "malformed_json": (['{"messages": [}'], "line 1", "JSON"),
    "unknown_format": ([{"prompt": "x", "completion": "y"}], "line 1", "keys found: completion, prompt"),
    "missing_content": ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], "line 1",
                        "messages[0].content"),
    "empty_content": ([{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}],
                      "line 1", "messages[0].content"),
    "unknown_role": ([good(0), {"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                     "line 2", "messages[0].role"),
    "non_string_content": ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                          {"role": "assistant", "content": "y"}]}], "line 1", "messages[0].content"),
    "channel_tags": ([{"messages": [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "<|channel|>final<|message|>y"}]}],
                     "line 1", "messages[1].content"),
    "empty_dataset": ([], "holds no records", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path, gpt_oss_tokenizer_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows, where, what = BAD_CASES[case]
    path = rows_file(tmp_path / "bad.jsonl", rows) if rows else tmp_path / "bad.jsonl"
    if not rows:
        path.write_text("")
    assert main(["data", "--model", str(gpt_oss_tokenizer_dir), "--dataset", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and where in err and what in err
    assert "Traceback" not in err
    assert "fix:" in err


def test_missing_file_in_a_subprocess(tmp_path: Path, gpt_oss_tokenizer_dir: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    out = subprocess.run([sys.executable, "-m", "osstune", "data", "--model", str(gpt_oss_tokenizer_dir),
                          "--dataset", str(missing)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert str(missing) in out.stderr and "no such file" in out.stderr and "fix:" in out.stderr


def test_strict_false_reports_skips(tmp_path: Path, gpt_oss_tokenizer_dir: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    rows = [good(0), {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, good(2)]
    path = rows_file(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert main(["data", "--model", str(gpt_oss_tokenizer_dir), "--dataset", str(path), "--strict", "false",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped record" in printed and "unknown_role" in printed
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 2]
