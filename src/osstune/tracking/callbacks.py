"""Send training and evaluation logs to experiment trackers (SwanLab, TensorBoard) from the Hugging Face Trainer.

The Trainer's log dicts are first turned into records of the ``logging.jsonl`` schema (:func:`to_record`), then
into tracker metrics (:func:`tracker_metrics`): ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/epoch``,
``train/tokens_per_s``, ``train/trained_tokens``, ``train/memory_gib``, ``eval/loss``, ``eval/ppl``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from osstune.errors import OsstuneError
from osstune.tracking.swanlab_tracker import SwanLabTracker, strip_secrets, swanlab_mode
from osstune.tracking.tensorboard import TensorBoardTracker, summary_writer_class

REPORT_TO_CHOICES = ("swanlab", "tensorboard", "none")
"""Accepted ``--report_to`` values."""

SAMPLES_KEY = "eval/samples"
"""Tracker key of the sample generations logged at each evaluation."""

TRAIN_FIELDS = ("loss", "lr", "grad_norm", "epoch", "tokens_per_s", "trained_tokens", "memory_gib", "elapsed_s")
EVAL_FIELDS = ("eval_loss", "eval_ppl", "epoch", "elapsed_s")
FINAL_FIELDS = ("train_runtime_s", "train_loss")
"""Fields of the ``logging.jsonl`` schema (besides ``step``) for train, eval and final lines."""

HF_ALIASES = {"learning_rate": "lr", "train_runtime": "train_runtime_s"}
"""Trainer log names that differ from the schema's."""

TRACKER_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens_per_s": "train/tokens_per_s",
    "trained_tokens": "train/trained_tokens",
    "memory_gib": "train/memory_gib",
    "eval_loss": "eval/loss",
    "eval_ppl": "eval/ppl",
}
"""Schema field to tracker metric name."""


class Tracker(Protocol):
    """Where metrics go: SwanLab, TensorBoard, or a test double."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar ``metrics`` (tracker names, e.g. ``train/loss``) at optimizer step ``step``."""

    def log_text(self, key: str, texts: Sequence[str], step: int) -> None:
        """Log ``texts`` (sample generations) under ``key`` at optimizer step ``step``."""

    def finish(self) -> None:
        """Flush and close; a second call does nothing."""


def parse_report_to(report_to: Sequence[str]) -> list[str]:
    """Validate ``--report_to`` values (several allowed, also comma-separated) and return them without repeats.

    Args:
        report_to: values such as ``["swanlab"]``, ``["swanlab", "tensorboard"]`` or ``["none"]``.

    Raises:
        OsstuneError: for an unknown name (naming the valid ones), or ``none`` together with a tracker.
    """
    names: list[str] = []
    for item in report_to:
        for name in (part.strip().lower() for part in str(item).split(",")):
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise OsstuneError(f"--report_to {' '.join(unknown)}: not supported. "
                           f"Choose from {', '.join(REPORT_TO_CHOICES)} (several may be given).")
    if "none" in names and len(names) > 1:
        raise OsstuneError("--report_to none cannot be combined with a tracker; give either none or the trackers.")
    return [n for n in names if n != "none"]


def make_trackers(
    report_to: Sequence[str],
    run_dir: Path,
    *,
    project: str,
    experiment: str | None,
    mode: str,
    config: Mapping[str, Any],
) -> list[Tracker]:
    """Start the trackers named by ``--report_to`` for one training run.

    Everything that can fail (names, SwanLab mode and API key, the tensorboard package) is checked before any
    tracker starts, so a bad flag never leaves a half-started run behind. In a distributed run the checks run on
    every process but only the main one (``RANK`` unset or 0) starts trackers; the others get an empty list.

    Args:
        report_to: tracker names: ``swanlab``, ``tensorboard``, ``none`` (see :func:`parse_report_to`).
        run_dir: the training run folder; SwanLab writes under ``run_dir/swanlog``, TensorBoard under
            ``run_dir/tensorboard``.
        project: SwanLab project (``--swanlab_project``).
        experiment: SwanLab experiment name (``--swanlab_exp_name``); None uses the run folder's name.
        mode: SwanLab mode (``--swanlab_mode``): ``local``, ``offline``, ``cloud`` or ``disabled``.
        config: the resolved configuration to record; secrets are stripped before any tracker sees it.

    Returns:
        The started trackers, in the order named (empty for ``none`` and on processes other than the main one).
    """
    names = parse_report_to(report_to)
    if "swanlab" in names:
        swanlab_mode(mode)
    if "tensorboard" in names:
        summary_writer_class()
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return []
    clean = strip_secrets(config)
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "swanlab":
                trackers.append(SwanLabTracker.start(run_dir, project=project, experiment=experiment, mode=mode,
                                                     config=clean))
            else:
                trackers.append(TensorBoardTracker(run_dir / "tensorboard", clean))
    except BaseException:
        for tracker in trackers:
            tracker.finish()
        raise
    return trackers


def _number(value: Any) -> float | int | None:
    """A plain int or float from a log value (tensors and numpy scalars included); None when not numeric."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def to_record(logs: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Turn one Trainer log dict into a ``logging.jsonl`` record.

    Trainer names are renamed (``learning_rate`` -> ``lr``, ``train_runtime`` -> ``train_runtime_s``), fields
    outside the schema are dropped, and ``eval_ppl`` is computed as ``exp(eval_loss)`` when missing. Fields that
    the trainer adds itself (``tokens_per_s``, ``trained_tokens``, ``memory_gib``, ``elapsed_s``) pass through.

    Args:
        logs: the dict given to ``TrainerCallback.on_log`` (or already a schema record).
        step: the optimizer step (``state.global_step``).
    """
    known = set(TRAIN_FIELDS) | set(EVAL_FIELDS) | set(FINAL_FIELDS)
    record: dict[str, Any] = {"step": int(step)}
    for key, value in logs.items():
        name = HF_ALIASES.get(key, key)
        number = _number(value)
        if name in known and number is not None:
            record[name] = number
    if "eval_loss" in record and "eval_ppl" not in record:
        try:
            record["eval_ppl"] = math.exp(record["eval_loss"])
        except OverflowError:
            record["eval_ppl"] = math.inf
    if "trained_tokens" in record:
        record["trained_tokens"] = int(record["trained_tokens"])
    return record


def record_kind(record: Mapping[str, Any]) -> str | None:
    """``eval``, ``final``, ``train``, or None for a record with no metric.

    Args:
        record: a ``logging.jsonl`` record.
    """
    if "eval_loss" in record:
        return "eval"
    if any(k in record for k in FINAL_FIELDS):
        return "final"
    if any(k in record for k in TRAIN_FIELDS if k not in ("epoch", "elapsed_s")):
        return "train"
    return None


def tracker_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The tracker metrics of a train or eval record (``train/loss``...); empty for final and other records.

    Args:
        record: a ``logging.jsonl`` record (see :func:`to_record`).
    """
    kind = record_kind(record)
    if kind not in ("train", "eval"):
        return {}
    fields = TRAIN_FIELDS if kind == "train" else ("eval_loss", "eval_ppl")
    return {TRACKER_KEYS[f]: record[f] for f in fields if f in TRACKER_KEYS and record.get(f) is not None}


def format_sample(prompt: str, response: str) -> str:
    """One sample generation as a single text: the prompt, a rule, the model's response.

    Args:
        prompt: what the model was given (e.g. the last user message).
        response: what it generated.
    """
    return f"{prompt}\n\n---\n\n{response}"


class MetricsCallback(TrainerCallback):
    """Forwards every train and eval log of the Trainer to the trackers, and closes them when training ends.

    Only the main process (``state.is_world_process_zero``) forwards. Sample generations are logged by the
    trainer through :meth:`log_samples`.

    Args:
        trackers: the sinks, usually from :func:`make_trackers`; an empty list makes the callback a no-op.
    """

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        """Convert ``logs`` to tracker metrics and log them at ``state.global_step``.

        Args:
            args: the ``TrainingArguments`` (unused).
            state: the ``TrainerState``; gives the step and whether this is the main process.
            control: the ``TrainerControl`` (unused).
            logs: the Trainer's log dict.
            **kwargs: other Trainer objects (unused).
        """
        if not logs or not state.is_world_process_zero:
            return
        metrics = tracker_metrics(to_record(logs, state.global_step))
        if metrics:
            for tracker in self.trackers:
                tracker.log(metrics, state.global_step)

    def log_samples(self, samples: Sequence[tuple[str, str]], step: int) -> None:
        """Log sample generations (``(prompt, response)`` pairs) under ``eval/samples``.

        Args:
            samples: the pairs generated at this evaluation.
            step: the optimizer step.
        """
        texts = [format_sample(prompt, response) for prompt, response in samples]
        if texts:
            for tracker in self.trackers:
                tracker.log_text(SAMPLES_KEY, texts, step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close every tracker (SwanLab flushes; offline mode prints its ``swanlab sync`` command).

        Args:
            args: the ``TrainingArguments`` (unused).
            state: the ``TrainerState`` (unused).
            control: the ``TrainerControl`` (unused).
            **kwargs: other Trainer objects (unused).
        """
        self.finish()

    def finish(self) -> None:
        """Close every tracker; safe to call again (e.g. from a ``finally`` after a crash)."""
        for tracker in self.trackers:
            tracker.finish()
