"""Terminal views of prepared data: the statistics table and previews with trained tokens highlighted."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from osstune.chat.options import IGNORE_INDEX
from osstune.data.pipeline import PrepareReport


def report_table(report: PrepareReport) -> Group:
    """Rows per source and format, length percentiles, trained-token share, skipped/dropped/truncated counts."""
    sources = Table(title="Sources" + (" (from cache)" if report.from_cache else ""), title_justify="left")
    for col in ("source", "format", "rows", "skipped", "samples"):
        sources.add_column(col, justify="left" if col in ("source", "format") else "right")
    for s in report.sources:
        sources.add_row(s.source, s.format, f"{s.rows:,}", f"{s.skipped:,}", f"{s.samples:,}")

    summary = Table(title="Tokens", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("samples", f"{len(report.lengths):,}")
    for name, value in report.percentiles().items():
        summary.add_row(f"length {name}", f"{value:,}")
    share = report.trained_tokens / report.total_tokens if report.total_tokens else 0.0
    summary.add_row("trained tokens", f"{report.trained_tokens:,} of {report.total_tokens:,} ({share:.1%})")
    summary.add_row("truncated samples", f"{report.truncated:,}")

    parts: list[Any] = [sources, summary]
    if report.skipped or report.dropped:
        losses = Table(title="Skipped records and dropped samples", title_justify="left")
        for col in ("what", "reason", "count", "example"):
            losses.add_column(col, overflow="fold")
        for reason, n in sorted(report.skipped.items()):
            losses.add_row("skipped record", reason, f"{n:,}", report.examples.get(reason, ""))
        for reason, n in sorted(report.dropped.items()):
            losses.add_row("dropped sample", reason, f"{n:,}", "")
        parts.append(losses)
    return Group(*parts)


def preview_text(tokenizer: Any, input_ids: np.ndarray, labels: np.ndarray) -> Text:
    """Decode a sample with trained tokens highlighted (bold green on a dark background) and context dimmed."""
    text = Text()
    trained = np.asarray(labels) != IGNORE_INDEX
    ids = np.asarray(input_ids)
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            piece = tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False)
            text.append(piece, style="bold green on grey15" if trained[start] else "dim")
            start = i
    return text
