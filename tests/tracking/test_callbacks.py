"""From Trainer logs to tracker metrics: the schema mapping, --report_to validation and the callback's forwarding."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from osstune.errors import OsstuneError
from osstune.tracking.callbacks import (
    MetricsCallback,
    format_sample,
    make_trackers,
    parse_report_to,
    record_kind,
    to_record,
    tracker_metrics,
)


class RecordingTracker:
    """A tracker that remembers every call."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.texts: list[tuple[str, list[str], int]] = []
        self.finished = 0

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def log_text(self, key, texts, step):
        self.texts.append((key, list(texts), step))

    def finish(self):
        self.finished += 1


def test_parse_report_to_accepts_lists_commas_and_none() -> None:
    assert parse_report_to(["swanlab"]) == ["swanlab"]
    assert parse_report_to(["swanlab", "tensorboard", "swanlab"]) == ["swanlab", "tensorboard"]
    assert parse_report_to(["tensorboard,SwanLab"]) == ["tensorboard", "swanlab"]
    assert parse_report_to(["none"]) == []
    assert parse_report_to([]) == []


def test_unknown_report_to_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(OsstuneError) as exc:
        make_trackers(["swanlab", "wandb"], tmp_path, project="p", experiment=None, mode="local", config={})
    assert "--report_to wandb: not supported" in str(exc.value)
    assert "swanlab, tensorboard, none" in str(exc.value)
    assert not (tmp_path / "swanlog").exists()


def test_none_cannot_be_combined() -> None:
    with pytest.raises(OsstuneError, match="none cannot be combined"):
        parse_report_to(["none", "swanlab"])


def test_report_to_none_starts_nothing(tmp_path: Path) -> None:
    assert make_trackers(["none"], tmp_path, project="p", experiment=None, mode="local", config={"a": 1}) == []
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_process_starts_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / ".swanlab"))
    monkeypatch.chdir(tmp_path)
    assert make_trackers(["swanlab"], tmp_path, project="p", experiment=None, mode="local", config={}) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OsstuneError, match="SWANLAB_API_KEY"):  # flags are still checked on every process
        make_trackers(["swanlab"], tmp_path, project="p", experiment=None, mode="cloud", config={})


def test_bad_swanlab_mode_is_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(OsstuneError, match="local, offline, cloud, disabled"):
        make_trackers(["swanlab"], tmp_path, project="p", experiment=None, mode="online", config={})


def test_to_record_maps_trainer_names_and_drops_the_rest() -> None:
    logs = {"loss": 1.5, "grad_norm": 0.25, "learning_rate": 2e-4, "epoch": 0.5, "num_input_tokens_seen": 999,
            "tokens_per_s": 1234.5, "trained_tokens": 4096.0, "memory_gib": 12.5, "elapsed_s": 30.0}
    record = to_record(logs, step=7)
    assert record == {"step": 7, "loss": 1.5, "grad_norm": 0.25, "lr": 2e-4, "epoch": 0.5, "tokens_per_s": 1234.5,
                      "trained_tokens": 4096, "memory_gib": 12.5, "elapsed_s": 30.0}
    assert isinstance(record["trained_tokens"], int)
    assert record_kind(record) == "train"


def test_to_record_eval_computes_ppl() -> None:
    record = to_record({"eval_loss": 1.25, "eval_runtime": 3.0, "eval_samples_per_second": 9.0, "epoch": 1.0}, 10)
    assert record == {"step": 10, "eval_loss": 1.25, "eval_ppl": math.exp(1.25), "epoch": 1.0}
    assert record_kind(record) == "eval"
    assert to_record({"eval_loss": 1e4}, 1)["eval_ppl"] == math.inf
    assert to_record({"eval_loss": 2.0, "eval_ppl": 7.0}, 1)["eval_ppl"] == 7.0


def test_to_record_final_line() -> None:
    record = to_record({"train_runtime": 60.5, "train_loss": 1.1, "total_flos": 1e12, "epoch": 3.0}, 30)
    assert record == {"step": 30, "train_runtime_s": 60.5, "train_loss": 1.1, "epoch": 3.0}
    assert record_kind(record) == "final"
    assert tracker_metrics(record) == {}


def test_tracker_metrics_names() -> None:
    train = {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, "epoch": 0.1, "tokens_per_s": 100.0,
             "trained_tokens": 300, "memory_gib": 2.0, "elapsed_s": 9.0}
    assert tracker_metrics(train) == {"train/loss": 1.5, "train/lr": 1e-4, "train/grad_norm": 0.5,
                                      "train/epoch": 0.1, "train/tokens_per_s": 100.0, "train/trained_tokens": 300,
                                      "train/memory_gib": 2.0}
    assert tracker_metrics({"step": 3, "loss": 1.5}) == {"train/loss": 1.5}
    assert tracker_metrics({"step": 5, "eval_loss": 1.0, "eval_ppl": math.e, "epoch": 0.2}) == {
        "eval/loss": 1.0, "eval/ppl": math.e}
    assert tracker_metrics({"step": 5, "epoch": 0.2}) == {}


def test_callback_forwards_train_and_eval_logs_and_samples() -> None:
    a, b = RecordingTracker(), RecordingTracker()
    cb = MetricsCallback([a, b])
    state = SimpleNamespace(is_world_process_zero=True, global_step=4)
    cb.on_log(None, state, None, logs={"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.25})
    cb.on_log(None, state, None, logs={"eval_loss": 1.5, "eval_runtime": 2.0})
    cb.on_log(None, state, None, logs={"train_runtime": 9.0, "train_loss": 2.0})
    cb.on_log(None, state, None, logs={})
    cb.log_samples([("What is 2+2?", "4"), ("Hi", "Hello!")], step=4)
    cb.log_samples([], step=5)
    for t in (a, b):
        assert t.logged == [({"train/loss": 2.0, "train/lr": 1e-4, "train/epoch": 0.25}, 4),
                            ({"eval/loss": 1.5, "eval/ppl": math.exp(1.5)}, 4)]
        assert t.texts == [("eval/samples", ["What is 2+2?\n\n---\n\n4", "Hi\n\n---\n\nHello!"], 4)]
    cb.on_train_end(None, state, None)
    cb.finish()
    assert (a.finished, b.finished) == (2, 2)


def test_callback_is_silent_on_other_ranks() -> None:
    t = RecordingTracker()
    cb = MetricsCallback([t])
    cb.on_log(None, SimpleNamespace(is_world_process_zero=False, global_step=1), None, logs={"loss": 1.0})
    assert t.logged == []


def test_format_sample() -> None:
    assert format_sample("p", "r") == "p\n\n---\n\nr"


def test_with_a_real_trainer(tmp_path: Path) -> None:
    """Every train and eval log of a (tiny, CPU) Trainer run reaches the tracker with the Trainer's values."""
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1.0))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": ((self.w * x - labels) ** 2).mean()}

    rows = [{"x": torch.tensor(float(i)), "labels": torch.tensor(2.0 * i)} for i in range(8)]
    tracker = RecordingTracker()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, per_device_train_batch_size=2, learning_rate=0.01, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=Scale(), args=args, train_dataset=rows, eval_dataset=rows,
                      callbacks=[MetricsCallback([tracker])])
    trainer.train()

    expected = []
    for entry in trainer.state.log_history:
        if "loss" in entry:
            expected.append(({"train/loss": entry["loss"], "train/lr": entry["learning_rate"],
                              "train/grad_norm": entry["grad_norm"], "train/epoch": entry["epoch"]}, entry["step"]))
        elif "eval_loss" in entry:
            expected.append(({"eval/loss": entry["eval_loss"], "eval/ppl": math.exp(entry["eval_loss"])},
                             entry["step"]))
    assert [step for _, step in expected] == [1, 2, 2, 3, 4, 4]
    assert tracker.logged == expected
    assert tracker.finished == 1
