"""The Hugging Face Trainer, with what osstune adds and nothing it already does.

Additions: atomic checkpoints (written to a staging folder, then renamed) with a rotation that never deletes the
newest one; a per-step non-finite loss guard; token counters kept on the device (no host sync per micro-step); and
train log lines that also carry tokens/s, trained tokens, peak memory and elapsed time.

Under several processes (DDP, FSDP2, DeepSpeed) every rank calls the checkpoint code and some write into it (RNG
states, optimizer shards): the main process alone prepares, renames and rotates the staging folder, with the ranks
agreeing on success before and after. The stop decision (non-finite loss, SIGINT/SIGTERM) and the logged token
counts are reduced over all ranks, so every rank stops at the same step and the logs describe the whole run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer

from osstune.chat.options import IGNORE_INDEX
from osstune.errors import OsstuneError
from osstune.models.memory import peak_host_bytes

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
# Keys the collators may add for bookkeeping; they never reach the model.
NON_MODEL_KEYS = ("num_trained_tokens",)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_bytes() / 2**30


def gathered_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of an FSDP2-sharded model, gathered whole on rank 0's CPU (empty on other ranks).

    A collective: every rank must call it. Only the adapter is gathered, never the frozen base weights, so saving a
    LoRA checkpoint costs the adapter's size, not the model's.

    Args:
        model: the model whose parameters ``fully_shard`` turned into DTensors (plain models work too).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


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

    def poll_stop(self, signal_number: int = 0) -> tuple[bool, int]:
        """Whether any rank saw a non-finite loss since the last call, and the signal any rank received.

        One host sync per optimizer step, plus one small all-reduce when several processes train, so that every
        rank takes the same decision at the same step.

        Args:
            signal_number: the SIGINT/SIGTERM number this process received, 0 for none.

        Returns:
            ``(nonfinite, signal_number)``: the signal is the highest number received by any rank (0 for none).
        """
        flags = torch.stack([self._nonfinite.to(torch.int64),
                             torch.tensor(signal_number, dtype=torch.int64, device=self._nonfinite.device)])
        if self._distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signum = (int(x) for x in flags.tolist())
        if nonfinite:
            self._nonfinite.zero_()
            self.nonfinite_step = self.state.global_step
        return bool(nonfinite), signum

    def _distributed(self) -> bool:
        """Whether several processes train together in an initialised process group."""
        return self.args.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (a barrier in a distributed run).

        Args:
            ok: this rank's verdict.
        """
        if not self._distributed():
            return ok
        flag = torch.tensor(int(ok), dtype=torch.int64, device=self.args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ---- logging ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add tokens/s, trained tokens, peak memory and elapsed time to train logs, then log as HF does."""
        now = time.perf_counter()
        if "loss" in logs:
            tokens, trained, memory = self._run_counters()
            last_time, last_tokens = self._last_log
            logs["tokens_per_s"] = (tokens - last_tokens) / max(now - last_time, 1e-9)
            logs["trained_tokens"] = trained
            logs["memory_gib"] = round(memory, 3)
            self._last_log = (now, tokens)
        logs["elapsed_s"] = round(now - self._start, 3)
        super().log(logs, start_time)

    def _run_counters(self) -> tuple[int, int, float]:
        """Tokens seen and trained by all ranks together, and the highest peak memory of any rank (GiB)."""
        counts = torch.stack([self._tokens, self._trained])
        memory = peak_memory_gib(self.args.device)
        if self._distributed():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            peak = torch.tensor(memory, dtype=torch.float32, device=self.args.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            memory = float(peak.item())
        tokens, trained = (int(x) for x in counts.tolist())
        return tokens, trained, memory

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (the adapter, for a PEFT model) as the Hugging Face Trainer does.

        Under FSDP only the trainable parameters are gathered (see :func:`gathered_trainable_state_dict`), where the
        Trainer would gather the whole model onto rank 0; the saved adapter is the same as a single process's.

        Args:
            output_dir: where to save (default ``args.output_dir``).
            _internal_call: as the Trainer's (checkpoint saves pass True).
        """
        from peft import PeftModel

        if self.is_fsdp_enabled and isinstance(self.model, PeftModel):
            state_dict = gathered_trainable_state_dict(self.model)
            self._save(output_dir, state_dict=state_dict)
            return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint into a staging folder, then rename it into place (atomic on one filesystem).

        Every rank runs this; the main process (``args.should_save``) alone clears, renames and rotates, and the
        ranks agree that every write succeeded before the rename and that the rename succeeded after it. A failure
        while writing (a full disk, say) on any rank leaves the complete checkpoints untouched and raises an
        OsstuneError naming the last complete one on every rank.
        """
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        main = self.args.should_save
        staging = run_dir / STAGING
        staged = staging / name
        error: OSError | None = None
        try:
            try:
                if main and staged.exists():
                    shutil.rmtree(staged)
            except OSError as exc:
                error = exc
            if self._all_ranks(error is None):
                self._staging = staging
                try:
                    super()._save_checkpoint(model, trial)
                    if main:
                        for extra in self.extra_files:
                            shutil.copy2(extra, staged / extra.name)
                        _fsync_tree(staged)
                except OSError as exc:
                    error = exc
                finally:
                    self._staging = None
            if self._all_ranks(error is None) and main:
                try:
                    final = run_dir / name
                    if final.exists():  # re-saving the same step (e.g. a signal right after a scheduled save)
                        shutil.rmtree(final)
                    os.replace(staged, final)
                    _fsync_dir(run_dir)
                    self._rotate(run_dir)
                except OSError as exc:
                    error = exc
            if not self._all_ranks(error is None):
                done = list_checkpoints(run_dir)
                reason = f" ({error})" if error is not None else " (on another rank)"
                raise OsstuneError(
                    f"writing {name} failed{reason}. Nothing was half-written: the last complete checkpoint is "
                    f"{done[-1] if done else '(none yet)'}. Free disk space, then --resume_from_checkpoint it."
                ) from error
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)

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
