"""``osstune export --adapters CKPT --merge_lora true``: a LoRA checkpoint merged into a standalone model folder.

The folder (``{CKPT}-merged`` by default, as ms-swift names it) loads with plain
``AutoModelForCausalLM.from_pretrained``: sharded safetensors with their index, ``config.json`` (without
``quantization_config`` unless ``--quant_method mxfp4``), the base model's tokenizer files, ``chat_template.jinja``
and ``generation_config.json``, the training run's ``args.json`` and a README.md model card. Weights are merged
tensor by tensor (``osstune.export.merge``), so memory stays near the largest single tensor, whatever the model's
size. Everything is written to a hidden sibling folder that is renamed into place at the end: an interrupted export
leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from osstune.config import flag
from osstune.errors import OsstuneError
from osstune.export.merge import MergedWeights, parse_size, plan_adapter, read_base_tensors, write_merged_weights
from osstune.export.model_card import CardFacts, model_card
from osstune.infer.loading import check_safetensors, resolve_base
from osstune.models.loading import check_weight_files, resolve_dtype
from osstune.models.local import is_gpt_oss, read_model_config, resolve_model_dir
from osstune.progress import progress_bar

QUANT_METHODS = ("none", "mxfp4")
"""``--quant_method`` values: dense weights, or gpt-oss experts in MXFP4 as the original checkpoint stores them."""

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
"""Files of the base model folder copied unchanged into the export, when present."""

GPT_OSS_QUANTIZATION_CONFIG: dict[str, Any] = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
"""The ``quantization_config`` of the released gpt-oss checkpoints, for an MXFP4 export of a dense gpt-oss base."""


@dataclass
class ExportArgs:
    """Flags of ``osstune export``."""

    adapters: str | None = flag(None, "LoRA checkpoint folder written by osstune sft (OUTPUT/v0-.../checkpoint-N).")
    model: str | None = flag(None, "Base model folder; default: the model recorded in the run's args.json.")
    merge_lora: bool = flag(False, "Merge the LoRA adapter into the base weights (export does nothing else yet).")
    output_dir: str | None = flag(None, "Folder of the merged model; default: the checkpoint's path + '-merged'.")
    quant_method: str = flag("none", "none: every weight in --torch_dtype; mxfp4: gpt-oss experts re-quantised to "
                             "MXFP4 under the original names (about the original checkpoint's size).",
                             choices=QUANT_METHODS)
    torch_dtype: str = flag("bfloat16", "dtype of the merged weights (auto: the base config's).",
                            choices=("bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "auto"))
    max_shard_size: str = flag("5GB", "Largest safetensors shard, e.g. 5GB, 500MB or 2GiB.")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Args:
        output_dir: the merged model's folder.
        weights: the shards and what the merge changed.
    """

    output_dir: Path
    weights: MergedWeights


def run(args: dict[type, Any]) -> int:
    """CLI entry point of ``osstune export``; returns the exit code.

    Args:
        args: parsed flag groups; reads ``ExportArgs``.
    """
    cmd: ExportArgs = args[ExportArgs]
    if not cmd.merge_lora:
        raise OsstuneError("osstune export: nothing to do. Exporting merges a LoRA checkpoint into its base model: "
                           "pass --adapters CHECKPOINT --merge_lora true.")
    if not cmd.adapters:
        raise OsstuneError("osstune export --merge_lora true: give --adapters CHECKPOINT, the LoRA checkpoint to "
                           "merge (e.g. output/v0-20250811-150539/checkpoint-551).")
    export_merged(cmd.adapters, model=cmd.model, output_dir=cmd.output_dir, quant_method=cmd.quant_method,
                  torch_dtype=cmd.torch_dtype, max_shard_size=cmd.max_shard_size)
    return 0


def export_merged(
    adapters: str | Path,
    *,
    model: str | None = None,
    output_dir: str | Path | None = None,
    quant_method: str = "none",
    torch_dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    console: Console | None = None,
) -> ExportResult:
    """Merge a LoRA checkpoint into its base model and write a standalone model folder.

    Args:
        adapters: the LoRA checkpoint (its run's ``args.json`` names the base model).
        model: the base model folder; overrides the one in ``args.json`` (required without one).
        output_dir: where to write; default ``{adapters}-merged``. It must not exist or be empty.
        quant_method: ``none`` or ``mxfp4`` (gpt-oss only; see ``ExportArgs``).
        torch_dtype: dtype of the weights: bfloat16, float16, float32 (or their short names), or auto.
        max_shard_size: largest shard, as bytes or a size such as ``5GB``.
        console: where to print progress; a stderr console when None.

    Returns:
        The folder and what was written.

    Raises:
        OsstuneError: a missing or corrupt checkpoint or base model, a checkpoint without ``args.json`` and no
            ``model``, an adapter trained on another base (naming the tensor and both shapes), an output folder
            that is in the way, or options that do not fit the model.
    """
    console = console or Console(stderr=True)
    if quant_method not in QUANT_METHODS:
        raise OsstuneError(f"--quant_method {quant_method}: use one of {', '.join(QUANT_METHODS)}.")
    max_shard_bytes = parse_size(max_shard_size)
    adapter_dir = Path(adapters)
    base_name, run_args = resolve_base(adapter_dir, model)
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    base_dir = resolve_model_dir(base_name).resolve()
    config = read_model_config(base_dir)
    dtype = resolve_dtype(torch_dtype, config)
    gpt_oss = is_gpt_oss(config)
    if quant_method == "mxfp4" and not gpt_oss:
        raise OsstuneError(f"--quant_method mxfp4 stores gpt-oss experts in MXFP4; {base_dir} is "
                           f"{config.get('model_type', 'another model')}. Use --quant_method none.")
    shards = _safetensors_shards(base_dir)
    out = Path(output_dir) if output_dir else Path(f"{str(adapter_dir).rstrip('/')}-merged")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OsstuneError(f"--output_dir {out} already exists and is not empty. Remove it or pass another "
                           "--output_dir.")

    base = read_base_tensors(shards)
    plan = plan_adapter(adapter_dir, base_dir, base)
    dtype_name = str(dtype).removeprefix("torch.")
    _say(console, f"export: merging {adapter_dir} into {base_dir} ({len(base)} tensors, {dtype_name}"
                  f"{', experts in MXFP4' if quant_method == 'mxfp4' else ''}) -> {out}")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        with progress_bar("merging", total=len(base), unit="tensors") as advance:
            weights = write_merged_weights(base_dir, base, plan, staging, dtype=dtype,
                                           mxfp4_experts=quant_method == "mxfp4", max_shard_bytes=max_shard_bytes,
                                           on_tensor=lambda _name: advance(1))
        _write_config(staging, config, dtype_name, quant_method)
        _copy_model_files(base_dir, staging, gpt_oss)
        if run_args:
            (staging / "args.json").write_text(json.dumps(run_args, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        facts = CardFacts(output_dir=str(out), base_model=str(base_dir), adapter_dir=str(adapter_dir),
                          dtype=dtype_name, quant_method=quant_method, num_shards=len(weights.files),
                          total_bytes=weights.total_bytes, run_args=run_args, adapter_config=plan.config,
                          is_gpt_oss=gpt_oss)
        (staging / "README.md").write_text(model_card(facts), encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    weights = _relocated(weights, out)
    requantized = f", {len(weights.requantized)} expert stacks re-quantised to MXFP4" if weights.requantized else ""
    _say(console, f"merged LoRA into {len(weights.changed)} tensors{requantized}; wrote {len(weights.files)} "
                  f"safetensors file(s), {weights.total_bytes / 2**20:,.1f} MiB, to {out}")
    return ExportResult(output_dir=out, weights=weights)


def _safetensors_shards(base_dir: Path) -> list[Path]:
    """The base model's safetensors files, each checked to be readable.

    Args:
        base_dir: the base model folder.

    Raises:
        OsstuneError: no weights, missing shards, a corrupt file, or weights that are not safetensors.
    """
    shards = check_weight_files(base_dir)
    if any(shard.suffix != ".safetensors" for shard in shards):
        raise OsstuneError(f"--model {base_dir}: export reads safetensors weights; this model has "
                           f"{shards[0].name}. Convert it with save_pretrained(safe_serialization=True) first.")
    for shard in shards:
        check_safetensors(shard)
    return shards


def _write_config(folder: Path, config: dict[str, Any], dtype_name: str, quant_method: str) -> None:
    """Write the export's ``config.json``: the base's, with the dtype written and the quantisation decided.

    Args:
        folder: the export folder.
        config: the base model's ``config.json``.
        dtype_name: the weights' dtype (``bfloat16`` ...).
        quant_method: ``none`` drops ``quantization_config``; ``mxfp4`` keeps the base's (or gpt-oss's).
    """
    out = {key: value for key, value in config.items() if key not in ("quantization_config", "torch_dtype")}
    out["dtype"] = dtype_name
    if quant_method == "mxfp4":
        out["quantization_config"] = config.get("quantization_config") or GPT_OSS_QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_model_files(base_dir: Path, folder: Path, gpt_oss: bool) -> None:
    """Copy the tokenizer, chat template and generation config; make sure ``chat_template.jinja`` exists.

    Args:
        base_dir: the base model folder.
        folder: the export folder.
        gpt_oss: whether the model is gpt-oss (its reference template is bundled with osstune).
    """
    for name in COPIED_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)
    template = folder / "chat_template.jinja"
    if template.exists():
        return
    tokenizer_config = folder / "tokenizer_config.json"
    embedded = (json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
                if tokenizer_config.is_file() else None)
    if isinstance(embedded, str):
        template.write_text(embedded, encoding="utf-8")
    elif gpt_oss:
        template.write_text((resources.files("osstune") / "resources" / "chat_template.jinja").read_text("utf-8"),
                            encoding="utf-8")


def _relocated(weights: MergedWeights, out: Path) -> MergedWeights:
    """``weights`` with its paths moved from the staging folder to the final one."""
    return MergedWeights(files=[out / f.name for f in weights.files],
                         index=out / weights.index.name if weights.index else None,
                         total_bytes=weights.total_bytes, changed=weights.changed, requantized=weights.requantized)


def _say(console: Console, text: str) -> None:
    """Print one line verbatim (paths may hold brackets)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)

