"""The README.md model card of an exported model: where it came from, how it was trained and how to use it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import osstune
from osstune.models.memory import format_bytes

RENDER_FIELDS: tuple[tuple[str, str], ...] = (
    ("current_date", "current date"),
    ("reasoning_effort", "reasoning effort"),
    ("model_identity", "model identity"),
    ("system", "default system message"),
)
"""``args.json`` keys of the prompt format, and how the card names them."""


@dataclass(frozen=True)
class CardFacts:
    """What the model card tells.

    Args:
        output_dir: the exported model's folder.
        base_model: the base model folder the adapter was merged into.
        adapter_dir: the LoRA checkpoint.
        dtype: dtype name of the dense weights, e.g. ``bfloat16``.
        quant_method: ``none`` or ``mxfp4`` (experts stored as MXFP4).
        num_shards: safetensors files written.
        total_bytes: bytes of tensor data written.
        run_args: the training run's ``args.json`` (may be empty).
        adapter_config: the adapter's ``adapter_config.json``.
        is_gpt_oss: whether the model uses the harmony format.
    """

    output_dir: str
    base_model: str
    adapter_dir: str
    dtype: str
    quant_method: str
    num_shards: int
    total_bytes: int
    run_args: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    is_gpt_oss: bool = True


def model_card(facts: CardFacts) -> str:
    """The README.md text of an exported model.

    Args:
        facts: what to tell.

    Returns:
        Markdown with a Hugging Face metadata header: the model's name and author, base model, adapter, training
        data, LoRA shape and targets, weight format, the prompt settings training used, osstune versions and usage.
    """
    run = facts.run_args
    title = _joined(run.get("model_name")) or facts.output_dir.rstrip("/").rsplit("/", 1)[-1]
    author = _joined(run.get("model_author"))
    tags = ["osstune", "lora", "merged"] + (["gpt-oss", "harmony"] if facts.is_gpt_oss else [])
    rows: list[tuple[str, str]] = [
        ("Base model", _code(facts.base_model)),
        ("Adapter", _code(facts.adapter_dir)),
        ("Training data", _code_list(run.get("dataset")) or "not recorded"),
    ]
    if run.get("val_dataset"):
        rows.append(("Validation data", _code_list(run["val_dataset"])))
    if author:
        rows.append(("Author", author))
    rows += [
        ("LoRA", _lora_shape(facts.adapter_config)),
        ("LoRA targets", _lora_targets(facts.adapter_config)),
        ("Weights", _weights(facts)),
        ("osstune", _versions(run.get("osstune_version"))),
    ]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["---", "", f"# {title}", ""]
    by = f" by {author}" if author else ""
    lines += [f"{title}{by}: {_code(facts.base_model)} fine-tuned with LoRA, the adapter merged into the weights.", ""]
    lines += ["| | |", "|---|---|"] + [f"| {name} | {_cell(value)} |" for name, value in rows]
    prompt = [(label, run[key]) for key, label in RENDER_FIELDS if run.get(key) is not None]
    if facts.is_gpt_oss and prompt:
        lines += ["", "## Prompt format", "",
                  "Training rendered conversations in the harmony format with these settings; pass the same ones at "
                  "inference for prompts identical to training:", ""]
        lines += [f"- {label}: {_code(str(value))}" for label, value in prompt]
    lines += ["", "## Use", "", "```bash", f"osstune infer --model {facts.output_dir}", "```", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({json.dumps(facts.output_dir)}, dtype=\"auto\")",
              f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(facts.output_dir)})", "```", ""]
    return "\n".join(lines)


def _joined(value: Any) -> str:
    """A ``model_name``/``model_author`` value (a string or a list such as Chinese then English) as one string."""
    if isinstance(value, (list, tuple)):
        return " / ".join(str(v) for v in value if v)
    return str(value) if value else ""


def _code(text: str) -> str:
    """Inline code."""
    return f"`{text}`"


def _code_list(values: Any) -> str:
    """Comma-separated inline code items ('' when there are none)."""
    if not values:
        return ""
    return ", ".join(_code(str(v)) for v in (values if isinstance(values, list) else [values]))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _lora_shape(config: dict[str, Any]) -> str:
    """Rank, alpha and the scaling they give."""
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not rank or alpha is None:
        return "not recorded"
    rslora = bool(config.get("use_rslora"))
    scaling = alpha / rank**0.5 if rslora else alpha / rank
    rule = "alpha / sqrt(rank), rsLoRA" if rslora else "alpha / rank"
    return f"rank {rank}, alpha {alpha} (scaling {scaling:g} = {rule})"


def _lora_targets(config: dict[str, Any]) -> str:
    """Target modules and parameters, with per-layer parameters summarised by layer ranges."""
    parts = []
    modules = config.get("target_modules")
    if modules:
        names = sorted(modules) if isinstance(modules, list) else [str(modules)]
        parts.append("modules " + ", ".join(names))
    by_suffix: dict[str, list[int]] = {}
    others: list[str] = []
    for name in config.get("target_parameters") or []:
        match = re.fullmatch(r"(?:.*\.)?(\d+)\.(.+)", name)
        if match:
            by_suffix.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            others.append(name)
    for suffix, layers in sorted(by_suffix.items()):
        parts.append(f"{suffix} of layers {_ranges(layers)}")
    parts += others
    return "; ".join(parts) or "not recorded"


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` as ``0-3, 7``."""
    values = sorted(set(numbers))
    spans: list[str] = []
    start = previous = values[0]
    for value in values[1:] + [None]:  # type: ignore[list-item]
        if value is not None and value == previous + 1:
            previous = value
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ", ".join(spans)


def _weights(facts: CardFacts) -> str:
    """The weight format line."""
    files = "1 safetensors file" if facts.num_shards == 1 else f"{facts.num_shards} safetensors shards"
    experts = "; experts in MXFP4 (as the original gpt-oss checkpoint)" if facts.quant_method == "mxfp4" else ""
    return f"{facts.dtype}, {files}, {format_bytes(facts.total_bytes)}{experts}"


def _versions(trained: Any) -> str:
    """Which osstune trained and which exported."""
    exported = f"exported with {osstune.__version__}"
    return f"trained with {trained}, {exported}" if trained else exported
