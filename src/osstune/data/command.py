"""``osstune data``: validate datasets, print statistics, preview rendered samples and export them as JSONL."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel

from osstune.chat.tokenizer import is_harmony_tokenizer
from osstune.config import DataArgs, ModelArgs, TemplateArgs
from osstune.data.pipeline import Prepared, prepare_dataset
from osstune.data.report import preview_text, report_table
from osstune.models.local import is_gpt_oss, load_tokenizer, read_model_config, resolve_model_dir


@dataclass
class DataCommandArgs:
    """Flags of ``osstune data`` alone."""

    output: str | None = field(default=None, metadata={"help": "Write one JSON object per sample "
                               "({source, index, input_ids, labels}) to this .jsonl file, in dataset order."})
    preview: int = field(default=0, metadata={"help": "Show this many rendered samples with trained tokens "
                         "highlighted."})


def write_jsonl(path: Path, splits: dict[str, Prepared | None]) -> int:
    """Write samples in dataset order (train, then val when present); returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with_split = splits.get("val") is not None
    with tmp.open("w", encoding="utf-8") as f:
        for name, part in splits.items():
            if part is None:
                continue
            for i in range(len(part)):
                row = part[i]
                if with_split:
                    row["split"] = name
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    tmp.replace(path)
    return n


def run(args: dict[type, Any]) -> int:
    """Run ``osstune data`` with parsed flag groups; returns the exit code."""
    console = Console(stderr=False)
    model_dir = resolve_model_dir(args[ModelArgs].model)
    config = read_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template: TemplateArgs = args[TemplateArgs]
    data: DataArgs = args[DataArgs]
    cmd: DataCommandArgs = args[DataCommandArgs]
    if is_harmony_tokenizer(tokenizer):
        path = "harmony" + (" (gpt-oss)" if is_gpt_oss(config) else f" ({config.get('model_type', '?')})")
    else:
        path = f"chat template ({config.get('model_type', '?')})"
    console.print(f"[bold]model[/] {model_dir}  [bold]renderer[/] {path}  [bold]loss_scale[/] {template.loss_scale}"
                  f"  [bold]date[/] {template.current_date}")
    prepared = prepare_dataset(data, template.render_options(), tokenizer)
    console.print(report_table(prepared.report))
    for i in range(min(cmd.preview, len(prepared.train))):
        part = prepared.train
        title = f"sample {i}: {part.sources[i]} record {part.indices[i]} ({len(part.input_ids[i])} tokens)"
        console.print(Panel(preview_text(tokenizer, part.input_ids[i], part.labels[i]), title=title,
                            title_align="left", subtitle="[bold green]trained[/] / [dim]context[/]"))
    if cmd.output:
        n = write_jsonl(Path(cmd.output), {"train": prepared.train, "val": prepared.val})
        console.print(f"wrote {n:,} samples to {cmd.output}")
    return 0
