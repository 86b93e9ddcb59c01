"""--report_to tensorboard: a clear error without the package; event files with the exact values with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from osstune.errors import OsstuneError
from osstune.tracking.callbacks import make_trackers


def test_missing_tensorboard_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(OsstuneError) as exc:
        make_trackers(["swanlab", "tensorboard"], tmp_path, project="p", experiment=None, mode="local", config={})
    assert "pip install tensorboard" in str(exc.value)
    # checked before SwanLab starts: nothing was written
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_scalars_text_and_config(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tracker,) = make_trackers(["tensorboard"], tmp_path, project="p", experiment=None, mode="local",
                               config={"learning_rate": 0.5, "hub_token": "hf_do_not_log"})
    for step, loss in enumerate([2.0, 1.5, 1.25], 1):
        tracker.log({"train/loss": loss, "train/lr": 0.5}, step)
    tracker.log({"eval/loss": 0.75}, 3)
    tracker.log_text("eval/samples", ["prompt\n\n---\n\nanswer"], 3)
    tracker.finish()
    tracker.finish()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(3, 0.75)]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    (sample,) = texts["eval/samples/text_summary"]
    assert sample.step == 3
    assert sample.tensor_proto.string_val[0].decode() == "    prompt\n    \n    ---\n    \n    answer"
    (config,) = texts["config/text_summary"]
    assert b'"learning_rate": 0.5' in config.tensor_proto.string_val[0]
    assert b"hf_do_not_log" not in config.tensor_proto.string_val[0]
