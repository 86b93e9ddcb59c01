"""``osstune report``: charts, a self-contained HTML report and a terminal summary of a run, from its files.

Reads ``logging.jsonl`` (train, eval and final lines), ``args.json`` when present and ``samples.jsonl`` when present
(``{"step", "prompt", "response"}`` per line); needs no tracker. Charts are drawn with matplotlib's Agg canvas.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from osstune.errors import OsstuneError
from osstune.tracking.swanlab_tracker import strip_secrets

REPORT_NAME = "report.html"

KEY_CONFIG = (
    "model", "adapters", "dataset", "val_dataset", "train_type", "torch_dtype", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_ratio", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "max_length",
    "loss_scale", "reasoning_effort", "seed", "output_dir",
)
"""Configuration values shown at the top of the report, when ``args.json`` has them (at any nesting level)."""


@dataclass(frozen=True)
class Chart:
    """One chart of the report.

    Args:
        file: PNG file name in the run folder.
        title: chart title.
        ylabel: y axis label.
        series: ``(label, schema field, lines)``: which records to plot; ``lines`` is ``train`` or ``eval``.
    """

    file: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str, str], ...]


CHARTS = (
    Chart("report_loss.png", "Loss", "loss", (("train loss", "loss", "train"), ("eval loss", "eval_loss", "eval"))),
    Chart("report_lr.png", "Learning rate", "learning rate", (("lr", "lr", "train"),)),
    Chart("report_grad_norm.png", "Gradient norm", "grad norm", (("grad norm", "grad_norm", "train"),)),
    Chart("report_tokens_per_s.png", "Throughput", "tokens/s", (("tokens/s", "tokens_per_s", "train"),)),
    Chart("report_memory.png", "Memory", "GiB", (("memory", "memory_gib", "train"),)),
)


@dataclass
class RunLog:
    """The lines of a run's ``logging.jsonl``, split by kind.

    Args:
        train: train lines (they hold ``loss``), in file order.
        eval: eval lines (they hold ``eval_loss``), in file order.
        final: the last final line (``train_runtime_s``, ``train_loss``), or None.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None

    def series(self, key: str, lines: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` over ``lines`` (``train`` or ``eval``), skipping lines without it.

        Args:
            key: a schema field, e.g. ``loss``.
            lines: ``train`` or ``eval``.
        """
        rows = [r for r in (self.train if lines == "train" else self.eval) if _finite(r.get(key)) is not None]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_log(run_dir: Path) -> RunLog:
    """Read ``run_dir/logging.jsonl``.

    An unfinished last line (a run still writing) is ignored; keys may be missing on any line.

    Args:
        run_dir: the run folder.

    Raises:
        OsstuneError: when the file is missing (naming run folders found below ``run_dir``) or a line is not a
            JSON object.
    """
    path = run_dir / "logging.jsonl"
    if not path.is_file():
        runs = sorted(p.parent.name for p in run_dir.glob("*/logging.jsonl"))
        hint = (f" It holds runs: {', '.join(runs)}; give one of them." if runs
                else " Give a run folder (OUTPUT_DIR/vN-YYYYMMDD-HHMMSS) written by `osstune sft`.")
        raise OsstuneError(f"{run_dir}: no logging.jsonl.{hint}")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    log = RunLog()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline yet: the trainer is writing this line
                continue
            raise OsstuneError(f"{path}, line {number}: not valid JSON. Each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise OsstuneError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        if "eval_loss" in record:
            log.eval.append(record)
        elif "train_runtime_s" in record or "train_loss" in record:
            log.final = record
        elif "step" in record:
            log.train.append(record)
    return log


def read_config(run_dir: Path) -> dict[str, Any]:
    """``run_dir/args.json`` without secrets, or an empty dict when the file is absent or not a JSON object.

    Args:
        run_dir: the run folder.
    """
    path = run_dir / "args.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return strip_secrets(data) if isinstance(data, dict) else {}


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """Lines of ``run_dir/samples.jsonl`` that hold a step, a prompt and a response (empty when absent).

    Args:
        run_dir: the run folder.
    """
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"step", "prompt", "response"} <= row.keys():
            out.append(row)
    return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def key_config(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The :data:`KEY_CONFIG` values present in ``config`` (nested keys match on their last part), in that order.

    Args:
        config: the run's configuration.
    """
    flat = _flatten(config)
    by_leaf: dict[str, Any] = {}
    for name, value in flat.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], value)
    return [(k, by_leaf[k]) for k in KEY_CONFIG if k in by_leaf and by_leaf[k] not in (None, [], "")]


@dataclass(frozen=True)
class Summary:
    """Headline numbers of a run; None where the log has no such value.

    Args:
        steps: last step logged.
        epoch: last epoch logged.
        final_loss: train loss of the last train line, and ``final_loss_step`` its step.
        best_eval_loss: lowest eval loss, ``best_eval_step`` its step, ``best_eval_ppl`` the ppl logged with it.
        final_eval_loss: eval loss of the last eval line.
        tokens_per_s: median of the logged tokens/s.
        peak_memory_gib: largest logged memory.
        trained_tokens: last logged count of trained tokens.
        train_runtime_s: from the final line, else the last ``elapsed_s``.
    """

    steps: int | None
    epoch: float | None
    final_loss: float | None
    final_loss_step: int | None
    best_eval_loss: float | None
    best_eval_step: int | None
    best_eval_ppl: float | None
    final_eval_loss: float | None
    tokens_per_s: float | None
    peak_memory_gib: float | None
    trained_tokens: int | None
    train_runtime_s: float | None


def summarize(log: RunLog) -> Summary:
    """Compute the headline numbers of a run.

    Args:
        log: the run's log (see :func:`read_log`).
    """
    everything = [*log.train, *log.eval, *([log.final] if log.final else [])]
    steps = [int(r["step"]) for r in everything if isinstance(r.get("step"), int)]
    epochs = [e for r in everything if (e := _finite(r.get("epoch"))) is not None]
    loss_steps, losses = log.series("loss", "train")
    _, eval_losses = log.series("eval_loss", "eval")
    evals = [r for r in log.eval if _finite(r.get("eval_loss")) is not None]
    best = min(evals, key=lambda r: float(r["eval_loss"])) if evals else None
    best_ppl = _finite(best.get("eval_ppl")) if best else None
    if best is not None and best_ppl is None and best["eval_loss"] < 700:
        best_ppl = math.exp(best["eval_loss"])
    _, speeds = log.series("tokens_per_s", "train")
    _, memory = log.series("memory_gib", "train")
    _, tokens = log.series("trained_tokens", "train")
    _, elapsed = log.series("elapsed_s", "train")
    runtime = _finite(log.final.get("train_runtime_s")) if log.final else None
    return Summary(
        steps=max(steps) if steps else None,
        epoch=epochs[-1] if epochs else None,
        final_loss=losses[-1] if losses else None,
        final_loss_step=loss_steps[-1] if loss_steps else None,
        best_eval_loss=float(best["eval_loss"]) if best else None,
        best_eval_step=int(best["step"]) if best else None,
        best_eval_ppl=best_ppl,
        final_eval_loss=eval_losses[-1] if eval_losses else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        peak_memory_gib=max(memory) if memory else None,
        trained_tokens=int(tokens[-1]) if tokens else None,
        train_runtime_s=runtime if runtime is not None else (elapsed[-1] if elapsed else None),
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _metric_rows(s: Summary) -> list[tuple[str, str]]:
    """(name, value) rows shared by the HTML table and the terminal summary."""
    rows: list[tuple[str, str]] = []
    if s.steps is not None:
        rows.append(("steps", f"{s.steps:,}" + (f" (epoch {s.epoch:.2f})" if s.epoch is not None else "")))
    if s.final_loss is not None:
        rows.append(("final train loss", f"{s.final_loss:.4f} at step {s.final_loss_step:,}"))
    if s.best_eval_loss is not None:
        ppl = f" (ppl {s.best_eval_ppl:.2f})" if s.best_eval_ppl is not None else ""
        rows.append(("best eval loss", f"{s.best_eval_loss:.4f} at step {s.best_eval_step:,}{ppl}"))
    if s.final_eval_loss is not None:
        rows.append(("final eval loss", f"{s.final_eval_loss:.4f}"))
    rows.append(("tokens/s (median)", f"{s.tokens_per_s:,.0f}" if s.tokens_per_s is not None else "not recorded"))
    if s.trained_tokens is not None:
        rows.append(("trained tokens", f"{s.trained_tokens:,}"))
    rows.append(("peak memory", f"{s.peak_memory_gib:.1f} GiB" if s.peak_memory_gib is not None else "not recorded"))
    if s.train_runtime_s is not None:
        rows.append(("train runtime", _duration(s.train_runtime_s)))
    return rows


def draw_charts(log: RunLog, run_dir: Path) -> list[Chart]:
    """Write the PNG charts that have data into ``run_dir`` and return them (a chart without data is skipped).

    Args:
        log: the run's log.
        run_dir: where the PNG files go.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = []
    for chart in CHARTS:
        series = [(label, *log.series(key, lines)) for label, key, lines in chart.series]
        if not any(steps for _, steps, _ in series):
            continue
        fig = Figure(figsize=(7.0, 3.6), dpi=110, layout="tight")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, steps, values in series:
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set_title(chart.title)
        ax.set_xlabel("step")
        ax.set_ylabel(chart.ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.savefig(run_dir / chart.file, format="png")
        drawn.append(chart)
    return drawn


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
td, th { border-bottom: 1px solid #ddd; padding: 0.3rem 1rem 0.3rem 0; text-align: left; vertical-align: top; }
img { max-width: 100%; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.6rem; border-radius: 4px; }
.muted { color: #777; }
"""


def _html_value(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return html.escape(text)


def render_html(run_dir: Path, log: RunLog, config: Mapping[str, Any], charts: Sequence[Chart],
                samples: Sequence[Mapping[str, Any]]) -> str:
    """The report page: key configuration, metrics table, charts (embedded and linked), samples, full config.

    Args:
        run_dir: the run folder (its name is the title; chart files are read from it).
        log: the run's log.
        config: the run's configuration (already without secrets).
        charts: the charts drawn into ``run_dir``.
        samples: sample generations (``step``, ``prompt``, ``response``).
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>osstune run report: {esc(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>osstune run report: {esc(run_dir.name)}</h1>",
        f'<p class="muted">{esc(str(run_dir))} &middot; generated {datetime.now():%Y-%m-%d %H:%M}</p>',
    ]
    key_values = key_config(config)
    if key_values:
        parts.append("<h2>Configuration</h2><table>")
        parts += [f"<tr><th>{esc(k)}</th><td>{_html_value(v)}</td></tr>" for k, v in key_values]
        parts.append("</table>")
    parts.append("<h2>Metrics</h2><table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _metric_rows(summarize(log))]
    parts.append("</table>")
    if charts:
        parts.append("<h2>Charts</h2>")
        for chart in charts:
            data = base64.b64encode((run_dir / chart.file).read_bytes()).decode("ascii")
            parts.append(f'<p><a href="{esc(chart.file)}"><img alt="{esc(chart.title)}" '
                         f'src="data:image/png;base64,{data}"></a></p>')
    if samples:
        parts.append("<h2>Sample generations</h2>")
        steps = sorted({int(s["step"]) for s in samples}, reverse=True)
        for i, step in enumerate(steps):
            parts.append(f"<details{' open' if i == 0 else ''}><summary>step {step:,}</summary>")
            for s in (s for s in samples if int(s["step"]) == step):
                parts.append(f"<h4>prompt</h4><pre>{esc(str(s['prompt']))}</pre>"
                             f"<h4>response</h4><pre>{esc(str(s['response']))}</pre>")
            parts.append("</details>")
    if config:
        parts.append("<h2>Full configuration</h2><details><summary>args.json</summary>"
                     f"<pre>{esc(json.dumps(config, indent=2, ensure_ascii=False))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write the PNG charts and ``report.html`` into a run folder; return the report's path.

    Args:
        run_dir: a run folder holding ``logging.jsonl`` (``args.json`` and ``samples.jsonl`` are optional).

    Raises:
        OsstuneError: when ``logging.jsonl`` is missing or malformed.
    """
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    charts = draw_charts(log, run_dir)
    page = render_html(run_dir, log, read_config(run_dir), charts, read_samples(run_dir))
    out = run_dir / REPORT_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def summary_lines(run_dir: Path) -> list[str]:
    """A short terminal summary: steps, final loss, best eval loss, tokens/s, peak memory, where the report is.

    Args:
        run_dir: a run folder holding ``logging.jsonl``.

    Raises:
        OsstuneError: when ``logging.jsonl`` is missing or malformed.
    """
    run_dir = Path(run_dir)
    rows = _metric_rows(summarize(read_log(run_dir)))
    report = run_dir / REPORT_NAME
    where = str(report) if report.is_file() else f"not written yet (osstune report {run_dir})"
    return [f"{name}: {value}" for name, value in rows] + [f"report: {where}"]


@dataclass
class ReportArgs:
    """Flags of ``osstune report``."""

    run_dir: str = field(metadata={"positional": True, "help": "The run folder (OUTPUT_DIR/vN-YYYYMMDD-HHMMSS)."})


def run(args: dict[type, Any]) -> int:
    """Run ``osstune report`` with parsed flag groups: write the report, print the summary; returns 0."""
    run_dir = Path(args[ReportArgs].run_dir)
    write_report(run_dir)
    for line in summary_lines(run_dir):
        print(line)
    return 0
