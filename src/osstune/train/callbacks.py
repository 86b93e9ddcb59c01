"""Trainer callbacks of a run: ``logging.jsonl``, stop-and-save on SIGINT/SIGTERM, the non-finite loss guard,
and sample generations at each evaluation."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from osstune.chat.options import IGNORE_INDEX
from osstune.tracking.callbacks import MetricsCallback, record_kind, to_record


class JsonlLogger(TrainerCallback):
    """Appends one JSON line per log step to ``RUN_DIR/logging.jsonl`` (flushed at once; main process only).

    Args:
        path: the ``logging.jsonl`` file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        """Write the schema record of ``logs`` (see :func:`osstune.tracking.callbacks.to_record`)."""
        if not logs or not state.is_world_process_zero:
            return
        record = to_record(logs, state.global_step)
        if record_kind(record) is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class RunGuard(TrainerCallback):
    """Stops training safely: after SIGINT/SIGTERM (saving a checkpoint first) or a non-finite loss (saving none).

    Under several processes the decision is taken together (see ``OsstuneTrainer.poll_stop``): a signal that
    reached any rank, or a non-finite loss on any rank, stops every rank after the same step.

    Args:
        trainer: the :class:`~osstune.train.trainer.OsstuneTrainer`, asked once per optimizer step whether a
            non-finite loss was seen or a signal arrived.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.signal_name: str | None = None

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """While active, the first SIGINT/SIGTERM asks for a checkpoint and a stop; a second SIGINT aborts."""
        def handler(signum: int, frame: Any) -> None:
            if self.signal_name is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            if self.trainer.is_world_process_zero():
                print(f"\n{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
                      "(Ctrl-C again aborts without saving).", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        """Runs after each optimizer step, after the Trainer decided whether to save."""
        received = signal.Signals[self.signal_name].value if self.signal_name is not None else 0
        nonfinite, signum = self.trainer.poll_stop(received)
        if nonfinite:
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
        elif signum:
            self.signal_name = self.signal_name or signal.Signals(signum).name
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        """An epoch-end save must not write weights that a non-finite step already spoiled."""
        if self.trainer.nonfinite_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control


def generation_prompts(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], n: int) -> list[list[int]]:
    """The first ``n`` validation prompts: each sample's tokens before its first trained token.

    For harmony that is the rendering up to and including the generation prompt ``<|start|>assistant``, exactly
    what inference feeds the model.
    """
    prompts = []
    for ids, lab in zip(input_ids, labels):
        trained = np.flatnonzero(np.asarray(lab) != IGNORE_INDEX)
        if len(trained) and trained[0] > 0:
            prompts.append(np.asarray(ids[: trained[0]]).tolist())
        if len(prompts) == n:
            break
    return prompts


class SampleGenerations(TrainerCallback):
    """At each evaluation, answers a few validation prompts greedily and logs them as text.

    Args:
        tokenizer: decodes prompts and answers.
        prompts: prompt token ids (see :func:`generation_prompts`).
        stop_ids: token ids that end generation (``<|return|>``, ``<|end|>``, ``<|call|>`` for gpt-oss).
        metrics: the tracking callback whose trackers receive the texts.
        path: ``RUN_DIR/samples.jsonl``, one line per (step, prompt, response).
        max_new_tokens: generation budget per prompt.
    """

    def __init__(self, tokenizer: Any, prompts: list[list[int]], stop_ids: list[int], metrics: MetricsCallback,
                 path: Path, max_new_tokens: int = 64) -> None:
        self.tokenizer, self.prompts, self.stop_ids = tokenizer, prompts, stop_ids
        self.metrics, self.path, self.max_new_tokens = metrics, path, max_new_tokens

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Generate, decode, log, append to ``samples.jsonl`` (main process only)."""
        if not self.prompts or model is None or not state.is_world_process_zero:
            return
        was_training = model.training
        model.eval()
        pairs = []
        try:
            with torch.no_grad():
                for prompt in self.prompts:
                    ids = torch.tensor([prompt], device=args.device)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=self.max_new_tokens, do_sample=False,
                                         eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0], use_cache=True)
                    answer = self.tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=False)
                    pairs.append((self.tokenizer.decode(prompt, skip_special_tokens=False), answer))
        finally:
            model.train(was_training)
        self.metrics.log_samples(pairs, state.global_step)
        with self.path.open("a", encoding="utf-8") as f:
            for prompt, response in pairs:
                f.write(json.dumps({"step": state.global_step, "prompt": prompt, "response": response},
                                   ensure_ascii=False) + "\n")
