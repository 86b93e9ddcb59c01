"""The Hugging Face Trainer, with what osstune adds and nothing it already does.

Additions: atomic checkpoints (written to a staging folder, then renamed) with a rotation that never deletes the
newest one; a per-step non-finite loss guard; token counters kept on the device (no host sync per micro-step); and
train log lines that also carry tokens/s, trained tokens, peak memory and elapsed time.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from osstune.chat.options import IGNORE_INDEX
from osstune.errors import OsstuneError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
# Keys the collators may add for bookkeeping; they never reach the model.
NON_MODEL_KEYS = ("num_trained_tokens",)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / (2**30 if sys.platform == "darwin" else 2**20)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging folders are never listed)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


class OsstuneTrainer(Trainer):
    """``transformers.Trainer`` with atomic checkpoints, a non-finite guard and throughput logging.

    Args:
        keep_checkpoints: ``--save_total_limit`` (None keeps all). The newest checkpoint is never deleted.
        extra_files: files copied into every checkpoint (``args.json``), so a checkpoint describes itself.
        *args, **kwargs: as ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, keep_checkpoints: int | None = None, extra_files: tuple[Path, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.extra_files = extra_files
        self.nonfinite_step: int | None = None
        self._staging: Path | None = None
        self._tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._trained = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.args.device)
        self._last_log = (time.perf_counter(), 0)
        self._start = time.perf_counter()

    # ---- inputs and counters -------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        for key in NON_MODEL_KEYS:
            inputs.pop(key, None)
        return super()._prepare_inputs(inputs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One micro-step; counts real and trained tokens and flags a non-finite loss, all on the device."""
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        self._tokens += (mask.sum() if mask is not None else torch.tensor(ids.numel())).to(self._tokens.device)
        # Positions that enter the loss: labels after the one-token shift (as the Trainer's num_items_in_batch).
        self._trained += (inputs["labels"][..., 1:] != IGNORE_INDEX).sum().to(self._trained.device)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite |= ~torch.isfinite(loss.detach()).to(self._nonfinite.device)
        return loss

    def take_nonfinite(self) -> bool:
        """Whether a non-finite loss was seen since the last call (one host sync per optimizer step)."""
        if bool(self._nonfinite.item()):
            self._nonfinite.zero_()
            self.nonfinite_step = self.state.global_step
            return True
        return False

    # ---- logging ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add tokens/s, trained tokens, peak memory and elapsed time to train logs, then log as HF does."""
        now = time.perf_counter()
        if "loss" in logs:
            tokens, trained = int(self._tokens.item()), int(self._trained.item())
            last_time, last_tokens = self._last_log
            logs["tokens_per_s"] = (tokens - last_tokens) / max(now - last_time, 1e-9)
            logs["trained_tokens"] = trained
            logs["memory_gib"] = round(peak_memory_gib(self.args.device), 3)
            self._last_log = (now, tokens)
        logs["elapsed_s"] = round(now - self._start, 3)
        super().log(logs, start_time)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint into a staging folder, then rename it into place (atomic on one filesystem).

        A failure while writing (a full disk, say) leaves the complete checkpoints untouched and raises an
        OsstuneError naming the last complete one.
        """
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = run_dir / STAGING
        staged = self._staging / name
        try:
            if staged.exists():
                shutil.rmtree(staged)
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                for extra in self.extra_files:
                    shutil.copy2(extra, staged / extra.name)
                _fsync_tree(staged)
                final = run_dir / name
                if final.exists():  # re-saving the same step (e.g. a signal right after a scheduled save)
                    shutil.rmtree(final)
                os.replace(staged, final)
                _fsync_dir(run_dir)
                self._rotate(run_dir)
        except OSError as exc:
            done = list_checkpoints(run_dir)
            raise OsstuneError(
                f"writing {name} failed ({exc}). Nothing was half-written: the last complete checkpoint is "
                f"{done[-1] if done else '(none yet)'}. Free disk space, then --resume_from_checkpoint it."
            ) from exc
        finally:
            self._staging = None
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)

    def _rotate(self, run_dir: Path) -> None:
        """Delete the oldest checkpoints beyond ``keep_checkpoints``; the newest always stays."""
        if not self.keep_checkpoints:
            return
        checkpoints = list_checkpoints(run_dir)
        for old in checkpoints[: max(0, len(checkpoints) - max(1, self.keep_checkpoints))]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file of a folder to disk before it is renamed into place."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))
