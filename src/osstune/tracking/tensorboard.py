"""TensorBoard tracking through ``torch.utils.tensorboard`` (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from osstune.errors import OsstuneError


def summary_writer_class() -> type:
    """Return ``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        OsstuneError: when the ``tensorboard`` package is not installed, saying how to install it.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise OsstuneError(
            "--report_to tensorboard needs the tensorboard package, which is not installed. "
            "Install it with `pip install tensorboard`, or use --report_to swanlab."
        ) from None
    return SummaryWriter


def _indented(text: str) -> str:
    """Markdown code block by indentation, so TensorBoard shows the text verbatim."""
    return "\n".join("    " + line for line in text.splitlines() or [""])


class TensorBoardTracker:
    """Event files under ``run_dir/tensorboard`` (view with ``tensorboard --logdir OUTPUT_DIR``).

    Args:
        log_dir: folder for the event files (created if missing).
        config: configuration to record once as the text ``config`` (already stripped of secrets), or None.
    """

    def __init__(self, log_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        self.log_dir = log_dir
        self._writer = summary_writer_class()(log_dir=str(log_dir))
        self._finished = False
        if config:
            self._writer.add_text("config", _indented(json.dumps(config, indent=2, default=str)), 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write each metric as a scalar at ``step``.

        Args:
            metrics: metric name (``train/loss``...) to value.
            step: the optimizer step.
        """
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def log_text(self, key: str, texts: Sequence[str], step: int) -> None:
        """Write texts (sample generations) as one text entry at ``step``, samples separated by rules.

        Args:
            key: tag name, e.g. ``eval/samples``.
            texts: one text per sample.
            step: the optimizer step.
        """
        self._writer.add_text(key, "\n\n---\n\n".join(_indented(t) for t in texts), step)

    def finish(self) -> None:
        """Flush and close the event file (calling it again does nothing)."""
        if self._finished:
            return
        self._finished = True
        self._writer.close()
