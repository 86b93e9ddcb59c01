"""What ``osstune eval`` shows and writes: the terminal table, ``results.json``, ``generations.jsonl``, the bar
charts ``eval_metrics.png`` and the self-contained ``eval_report.html``.

The table, the HTML page and the JSON file read the same numbers; the table and the page format them with
:func:`format_metric`, so a printed value is the JSON value at the metric's precision.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

RESULTS_FILE = "results.json"
GENERATIONS_FILE = "generations.jsonl"
CHART_FILE = "eval_metrics.png"
REPORT_FILE = "eval_report.html"
HTML_EXAMPLES = 30
"""Generations shown in the HTML page (all of them are in ``generations.jsonl``)."""


@dataclass(frozen=True)
class Metric:
    """One row of the results table.

    Args:
        key: the name in ``results.json``.
        label: the name shown in the table, the page and the chart.
        fmt: format spec of the value (``format(value, fmt)``); the delta adds a sign.
        better: ``higher`` or ``lower`` when a direction is better (colours the delta), else ``""``.
        chart: whether the metric gets a bar panel in ``eval_metrics.png``.
    """

    key: str
    label: str
    fmt: str
    better: Literal["higher", "lower", ""] = ""
    chart: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("loss", "loss", ".4f", "lower", True),
    Metric("perplexity", "perplexity", ".3f", "lower", True),
    Metric("token_accuracy", "token accuracy", ".4f", "higher", True),
    Metric("scored_samples", "scored samples", ",d"),
    Metric("scored_tokens", "scored tokens", ",d"),
    Metric("exact_match", "exact match", ".4f", "higher", True),
    Metric("exact_match_count", "exact matches", ",d", "higher"),
    Metric("bleu", "BLEU", ".2f", "higher", True),
    Metric("chrf", "chrF", ".2f", "higher", True),
    Metric("response_tokens_mean", "answer tokens (mean)", ".1f"),
    Metric("response_tokens_median", "answer tokens (median)", ".1f"),
    Metric("reference_tokens_mean", "reference tokens (mean)", ".1f"),
    Metric("reference_tokens_median", "reference tokens (median)", ".1f"),
    Metric("completion_tokens_mean", "generated tokens (mean)", ".1f"),
    Metric("finished_share", "finished on a stop token", ".4f", "higher", True),
)
"""Every per-model metric, in table order."""


@dataclass
class ModelResult:
    """The evaluation of one model.

    Args:
        label: its column name: ``base`` and ``fine-tuned`` in a comparison, else ``model``.
        model: the model folder (the base folder when an adapter is applied).
        adapters: the LoRA checkpoint applied, if any.
        metrics: value per :data:`METRICS` key (None when not computed, e.g. generation metrics without references).
        generations: per generation record, in record order: ``response``, ``reasoning``, ``finished``,
            ``completion_tokens``, ``exact_match``.
    """

    label: str
    model: str
    adapters: str | None
    metrics: dict[str, float | int | None]
    generations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalReport:
    """Everything one ``osstune eval`` produced.

    Args:
        results: the evaluated models, the baseline first.
        records: per generation record: ``source``, ``index``, ``messages`` (the prompt) and ``reference``.
        settings: how the evaluation ran (data, rendering, generation and metric options).
    """

    results: list[ModelResult]
    records: list[dict[str, Any]]
    settings: dict[str, Any]

    def deltas(self) -> dict[str, float | int | None] | None:
        """Last model minus first for every metric, or None when only one model was evaluated."""
        if len(self.results) < 2:
            return None
        first, last = self.results[0].metrics, self.results[-1].metrics
        out: dict[str, float | int | None] = {}
        for metric in METRICS:
            a, b = first.get(metric.key), last.get(metric.key)
            out[metric.key] = None if a is None or b is None else b - a
        return out

    def to_json(self) -> dict[str, Any]:
        """The content of ``results.json``: settings, each model's metrics, and the deltas of a comparison."""
        out: dict[str, Any] = {
            "settings": self.settings,
            "models": {r.label: {"model": r.model, "adapters": r.adapters, "metrics": r.metrics}
                       for r in self.results},
        }
        deltas = self.deltas()
        if deltas is not None:
            out["deltas"] = {"of": self.results[-1].label, "minus": self.results[0].label, "metrics": deltas}
        return out

    def generation_lines(self) -> list[dict[str, Any]]:
        """One ``generations.jsonl`` object per record: the record, and each model's reply under ``responses``."""
        lines = []
        for i, record in enumerate(self.records):
            lines.append({**record, "responses": {r.label: r.generations[i] for r in self.results}})
        return lines


def format_metric(metric: Metric, value: float | int | None, *, delta: bool = False) -> str:
    """A metric value as the table and the page show it (``-`` for a missing or non-finite value).

    Args:
        metric: the metric.
        value: its value.
        delta: format as a signed difference.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    spec = f"+{metric.fmt}" if delta else metric.fmt
    return format(value, spec)


def _improved(metric: Metric, delta: float | int | None) -> bool | None:
    if not metric.better or delta is None or delta == 0:
        return None
    return (delta > 0) == (metric.better == "higher")


def metrics_table(report: EvalReport) -> Table:
    """The terminal table: one column per model and, in a comparison, a delta column (green better, red worse).

    Args:
        report: the evaluation.
    """
    table = Table(title="osstune eval", title_justify="left")
    table.add_column("metric")
    for result in report.results:
        table.add_column(result.label, justify="right")
    deltas = report.deltas()
    if deltas is not None:
        table.add_column("delta", justify="right")
    for metric in METRICS:
        cells = [format_metric(metric, r.metrics.get(metric.key)) for r in report.results]
        if deltas is not None:
            text = format_metric(metric, deltas[metric.key], delta=True)
            improved = _improved(metric, deltas[metric.key])
            cells.append(text if improved is None else f"[{'green' if improved else 'red'}]{text}[/]")
        table.add_row(metric.label, *cells)
    return table


def draw_metrics_chart(report: EvalReport, path: Path) -> None:
    """Write bar charts of the charted metrics, one panel each with one bar per model, plus answer lengths.

    Args:
        report: the evaluation.
        path: the PNG file to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    charted = [m for m in METRICS if m.chart]
    fig = Figure(figsize=(12.0, 6.0), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, math.ceil((len(charted) + 1) / 2)).flatten()
    colors = ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c"]
    labels = [r.label for r in report.results]
    for ax, metric in zip(axes, charted):
        values = [r.metrics.get(metric.key) for r in report.results]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(labels, heights, color=colors[: len(labels)])
        ax.bar_label(bars, labels=[format_metric(metric, v) for v in values], fontsize=8)
        ax.set_title(metric.label, fontsize=10)
        ax.set_ylim(0, max(heights) * 1.2 or 1.0)
    lengths = axes[len(charted)]
    names = [*labels, "reference"]
    means = [r.metrics.get("response_tokens_mean") for r in report.results]
    means.append(report.results[-1].metrics.get("reference_tokens_mean"))
    heights = [v or 0.0 for v in means]
    bars = lengths.bar(names, heights, color=[*colors[: len(labels)], "#d62728"])
    lengths.bar_label(bars, labels=["-" if v is None else f"{v:.1f}" for v in means], fontsize=8)
    lengths.set_title("answer tokens (mean)", fontsize=10)
    lengths.set_ylim(0, max(heights) * 1.2 or 1.0)
    for ax in axes[len(charted) + 1:]:
        ax.set_visible(False)
    fig.savefig(path, format="png")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 64rem; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
td, th { border-bottom: 1px solid #ddd; padding: 0.3rem 1rem 0.3rem 0; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #1a7f37; } .worse { color: #cf222e; }
img { max-width: 100%; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.6rem; border-radius: 4px; margin: 0.2rem 0; }
.muted { color: #777; }
"""


def _html_metrics(report: EvalReport) -> list[str]:
    esc = html.escape
    deltas = report.deltas()
    head = "".join(f"<th>{esc(r.label)}</th>" for r in report.results) + ("<th>delta</th>" if deltas else "")
    rows = [f"<table><tr><th>metric</th>{head}</tr>"]
    for metric in METRICS:
        cells = "".join(f'<td class="num">{esc(format_metric(metric, r.metrics.get(metric.key)))}</td>'
                        for r in report.results)
        if deltas is not None:
            improved = _improved(metric, deltas[metric.key])
            css = "" if improved is None else (" better" if improved else " worse")
            cells += f'<td class="num{css}">{esc(format_metric(metric, deltas[metric.key], delta=True))}</td>'
        rows.append(f"<tr><th>{esc(metric.label)}</th>{cells}</tr>")
    rows.append("</table>")
    return rows


def _html_settings(settings: Mapping[str, Any], results: Sequence[ModelResult]) -> list[str]:
    esc = html.escape
    rows = ["<table>"]
    for r in results:
        where = r.model + (f" + {r.adapters}" if r.adapters else "")
        rows.append(f"<tr><th>{esc(r.label)}</th><td>{esc(where)}</td></tr>")
    for key, value in settings.items():
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
        rows.append(f"<tr><th>{esc(key)}</th><td>{esc(text)}</td></tr>")
    rows.append("</table>")
    return rows


def _html_generations(report: EvalReport) -> list[str]:
    esc = html.escape
    parts = [f"<h2>Generations</h2><p class=\"muted\">The first {min(HTML_EXAMPLES, len(report.records))} of "
             f"{len(report.records)}; all are in {GENERATIONS_FILE}.</p>"]
    for i, line in enumerate(report.generation_lines()[:HTML_EXAMPLES]):
        prompt = "\n\n".join(f"[{m['role']}] {m['content']}" for m in line["messages"])
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{esc(line['source'])} record "
                     f"{line['index']}</summary><h4>prompt</h4><pre>{esc(prompt)}</pre>"
                     f"<h4>reference</h4><pre>{esc(line['reference'])}</pre>")
        for label, reply in line["responses"].items():
            mark = "exact match" if reply["exact_match"] else ("finished" if reply["finished"] else "cut off")
            parts.append(f"<h4>{esc(label)} <span class=\"muted\">({mark}, {reply['completion_tokens']} tokens)"
                         f"</span></h4><pre>{esc(reply['response'])}</pre>")
        parts.append("</details>")
    return parts


def render_html(report: EvalReport, chart: Path) -> str:
    """The report page: models and settings, the metrics table with deltas, the chart (embedded), generations.

    Args:
        report: the evaluation.
        chart: the PNG written by :func:`draw_metrics_chart` (embedded, and linked by file name).
    """
    esc = html.escape
    title = " vs ".join(r.label for r in report.results)
    data = base64.b64encode(chart.read_bytes()).decode("ascii")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>osstune eval: {esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>osstune eval: {esc(title)}</h1>",
        f'<p class="muted">generated {datetime.now():%Y-%m-%d %H:%M}</p>',
        "<h2>Metrics</h2>", *_html_metrics(report),
        f'<p><a href="{esc(chart.name)}"><img alt="metrics" src="data:image/png;base64,{data}"></a></p>',
        "<h2>Settings</h2>", *_html_settings(report.settings, report.results),
    ]
    if report.records:
        parts += _html_generations(report)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_outputs(report: EvalReport, output_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``generations.jsonl``, ``eval_metrics.png`` and ``eval_report.html``.

    Args:
        report: the evaluation.
        output_dir: the folder (created when missing; files of an earlier evaluation are replaced).

    Returns:
        The written paths by file name.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in (RESULTS_FILE, GENERATIONS_FILE, CHART_FILE, REPORT_FILE)}
    _write_text(paths[RESULTS_FILE], json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    _write_text(paths[GENERATIONS_FILE],
                "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in report.generation_lines()))
    draw_metrics_chart(report, paths[CHART_FILE])
    _write_text(paths[REPORT_FILE], render_html(report, paths[CHART_FILE]))
    return paths
