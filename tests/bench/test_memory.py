"""bench/memory.py and train_step.py's maxctx scenario on the tiny config (CPU): the memory-lean settings parse,
train the same losses as the plain cell, and the max-context search reports the longest length that trained."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> Any:
    """A benchmark script imported as a module (its folder on sys.path, as when it runs)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def memory() -> Any:
    return load("memory")


def test_lean_settings_parse_and_print_back(memory: Any) -> None:
    lean = memory.Lean.parse("opt+d4+acts+emb")
    assert lean == memory.Lean(dense_experts=4, activations=True, embeddings=True, optimizer=True)
    assert lean.label == "d4+acts+emb+opt"
    assert memory.Lean.parse("") == memory.Lean() and memory.Lean().label == "whole"
    assert memory.Lean.parse(memory.DEFAULT_LEAN).optimizer
    with pytest.raises(SystemExit, match="unknown part 'gpu'"):
        memory.Lean.parse("d4+gpu")


def test_lean_cells_train_the_same_losses(memory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert memory.main(["--tiny", "--cells", "20b,maxctx", "--lean", "d2+acts+emb+opt,emb", "--warmup", "0",
                        "--steps", "2"]) == 0
    cells = {cell["name"]: cell for cell in json.loads((tmp_path / "memory.json").read_text())}
    assert list(cells) == ["20b mxfp4 1x128", "20b mxfp4 lean d2+acts+emb+opt 1x128", "20b mxfp4 lean emb 1x128",
                           "20b bf16 1x128",
                           "20b mxfp4 lean d2+acts+emb+opt max context 1x256 (cap 80 GiB)",
                           "20b mxfp4 lean d2+acts+emb+opt max context 1x512 (cap 80 GiB)"]
    assert all(cell["status"] == "ok" for cell in cells.values())
    plain = cells["20b mxfp4 1x128"]["loss"]
    assert plain[1] < plain[0]  # it learns
    for name in ("20b mxfp4 lean d2+acts+emb+opt 1x128", "20b mxfp4 lean emb 1x128", "20b bf16 1x128"):
        first, last = cells[name]["loss"]
        assert first == plain[0], name  # same weights and tokens, LoRA B at zero: the base model's loss
        # Every cell starts from the same LoRA initialisation: the memory options change where tensors live and
        # how the experts are dequantised, not the arithmetic, so the update gives the same loss.
        assert last == pytest.approx(plain[1], rel=1e-6, abs=0), name
    lean = cells["20b mxfp4 lean d2+acts+emb+opt 1x128"]
    assert lean["host_gib"] is not None and cells["20b mxfp4 1x128"]["host_gib"] is None


def test_train_step_max_context_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    train_step = load("train_step")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert train_step.main(["--tiny", "--stacks", "osstune", "--scenarios", "maxctx", "--memory_cap_gib", "40",
                            "--lean", "d2+emb"]) == 0
    assert "max context under 40 GiB: 512" in capsys.readouterr().out
    record = json.loads((tmp_path / "train_step.json").read_text())
    assert record["max_context"] == 512
    assert [cell["tokens"] for cell in record["max_context_cells"]] == [256, 512]
