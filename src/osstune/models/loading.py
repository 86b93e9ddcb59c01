"""Loading a local model folder for training or inference: gpt-oss first-class, any other causal LM generically.

gpt-oss MXFP4 checkpoints are dequantised on load (``Mxfp4Config(dequantize=True)``) to the requested dtype, or,
with ``expert_weights="mxfp4"``, keep their experts as MXFP4 (``osstune.models.gpt_oss.mxfp4_experts``);
attention is ``flex_attention`` on CUDA and ``eager`` on CPU, the two transformers implementations that apply
gpt-oss's attention sinks. Other models load through ``AutoModelForCausalLM`` with sdpa attention.

Two memory-lean options for training: ``offload_embeddings`` keeps the input embedding table in host RAM
(``osstune.models.host_embedding``), and ``dequant_experts`` bounds the dense scratch of MXFP4 experts to that many experts' worth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from osstune.errors import OsstuneError
from osstune.models.local import is_gpt_oss, load_tokenizer, read_model_config, resolve_model_dir
from osstune.models.memory import estimate_load_bytes, format_bytes, free_memory_bytes, peak_host_bytes

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
"""``--torch_dtype`` spellings and the dtype each means (``auto`` is resolved from the config)."""

GPT_OSS_ATTN_IMPLS: tuple[str, ...] = ("eager", "flex_attention")
"""Attention implementations of transformers that apply gpt-oss's attention sinks (flex_attention on CUDA only)."""

WEIGHT_FILES: tuple[tuple[str, str], ...] = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
"""Weight layouts a model folder may use, in order of preference: a single file, or a sharded index."""

EXPERT_WEIGHTS: tuple[str, ...] = ("mxfp4", "bf16", "auto")
"""``--expert_weights`` choices: keep MXFP4 experts as MXFP4, dequantise them to the load dtype, or pick by memory."""


@dataclass
class LoadedModel:
    """A model ready for LoRA, with what was decided while loading it.

    Args:
        model: the ``PreTrainedModel`` (gpt-oss experts dequantised), on ``device``.
        tokenizer: the folder's tokenizer.
        model_dir: the model folder, absolute (PEFT records it in saved adapters).
        config: the parsed ``config.json``.
        is_gpt_oss: whether the model took the gpt-oss path (harmony rendering, expert LoRA).
        attn_impl: the attention implementation in use.
        dtype: the dtype of the weights.
        device: where the weights are.
        expert_weights: ``mxfp4`` when the gpt-oss experts stayed MXFP4 (``Mxfp4Experts``), else ``bf16`` (dense
            in ``dtype``).
        offload_embeddings: whether the input embedding table is in host RAM (``HostEmbedding``).
        dequant_experts: bound of the MXFP4 dequantisation scratch, in experts' worth of a layer's weights (0: a
            whole layer at once).
    """

    model: Any
    tokenizer: Any
    model_dir: Path
    config: dict[str, Any]
    is_gpt_oss: bool
    attn_impl: str
    dtype: torch.dtype
    device: torch.device
    expert_weights: str = "bf16"
    offload_embeddings: bool = False
    dequant_experts: int = 0


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    """The torch dtype meant by a ``--torch_dtype`` value.

    Args:
        name: bfloat16, bf16, float16, fp16, float32, fp32 or auto (case-insensitive).
        config: the model's ``config.json``; ``auto`` takes its ``dtype`` (or ``torch_dtype``), else bfloat16.

    Raises:
        OsstuneError: an unknown name.
    """
    key = name.lower()
    if key == "auto":
        key = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").lower()
    if key not in DTYPES:
        raise OsstuneError(f"--torch_dtype {name}: unknown dtype; use one of {', '.join(DTYPES)} or auto.")
    return DTYPES[key]


def resolve_device(device: str | None) -> torch.device:
    """The device to load onto.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N``; None picks the current CUDA device when CUDA is available, else the
            CPU.

    Raises:
        OsstuneError: an unknown device name, or CUDA asked for where it is not available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise OsstuneError(f"device {device!r}: not a device name; use cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OsstuneError(f"device {device}: CUDA is not available on this machine; use cpu.")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise OsstuneError(f"device {device}: osstune loads models onto cpu or cuda only.")
    return resolved


def resolve_attn_impl(attn_impl: str | None, *, gpt_oss: bool, device: torch.device) -> str:
    """The attention implementation to load the model with.

    Args:
        attn_impl: the user's choice; None or ``auto`` picks flex_attention on CUDA and eager on CPU for gpt-oss,
            sdpa for other models. Other models take any name transformers accepts.
        gpt_oss: whether the model is gpt-oss.
        device: the device the model is loaded onto.

    Raises:
        OsstuneError: for gpt-oss, an implementation that ignores its attention sinks (sdpa, flash_attention_2, ...),
            or flex_attention on CPU.
    """
    if not gpt_oss:
        return "sdpa" if attn_impl in (None, "auto") else attn_impl
    if attn_impl in (None, "auto"):
        return "flex_attention" if device.type == "cuda" else "eager"
    if attn_impl not in GPT_OSS_ATTN_IMPLS:
        raise OsstuneError(
            f"--attn_impl {attn_impl}: gpt-oss's attention has learned sinks, which {attn_impl} does not apply. "
            "Use flex_attention (CUDA) or eager (any device), or leave --attn_impl unset to pick one."
        )
    if attn_impl == "flex_attention" and device.type != "cuda":
        raise OsstuneError(
            "--attn_impl flex_attention: transformers applies gpt-oss's attention sinks with flex_attention on CUDA "
            "only. Use eager on the CPU."
        )
    return attn_impl


def check_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder, checked to exist.

    Args:
        model_dir: the model folder.

    Returns:
        The single weight file, or every shard named by the index, in index order.

    Raises:
        OsstuneError: no weights, an unreadable index, or a shard the index names is missing.
    """
    for single, index in WEIGHT_FILES:
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                weight_map = json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise OsstuneError(f"{model_dir / index}: not a weight index (no weight_map).") from None
            shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise OsstuneError(
                    f"--model {model_dir}: {missing[0]} is missing ({len(missing)} of {len(shards)} shards named by "
                    f"{index} are absent); the download is incomplete."
                )
            return shards
    raise OsstuneError(
        f"--model {model_dir}: model.safetensors is missing (no weights and no model.safetensors.index.json); "
        "the folder holds only the config and tokenizer, or the download is incomplete."
    )


def load_model(
    model: str | Path,
    *,
    torch_dtype: str = "bfloat16",
    attn_impl: str | None = None,
    device: str | None = None,
    console: Console | None = None,
    expert_weights: str = "bf16",
    compute_device: str | None = None,
    offload_embeddings: bool = False,
    dequant_experts: int = 0,
) -> LoadedModel:
    """Load a local causal LM and its tokenizer, printing the memory need and a one-line summary.

    Args:
        model: the model folder.
        torch_dtype: dtype of the loaded weights (see ``resolve_dtype``); MXFP4 experts are dequantised to it.
        attn_impl: attention implementation (see ``resolve_attn_impl``).
        device: where to load (see ``resolve_device``).
        console: where to print; a stderr console when None.
        expert_weights: gpt-oss MXFP4 experts: ``bf16`` dequantises them to ``torch_dtype``, ``mxfp4`` keeps them
            as MXFP4 and dequantises on the fly (see ``resolve_expert_weights``), ``auto`` picks ``mxfp4`` when the
            dense weights would not fit in the free memory of ``device``.
        compute_device: where the model will run when that is not ``device`` (ZeRO-3 and FSDP load on the CPU
            and shard onto the GPUs); the attention implementation is chosen for it.
        offload_embeddings: keep the input embedding table in host RAM and send only the rows of each batch to
            ``device`` (``osstune.models.host_embedding.offload_input_embeddings``); for training, with the
            embedding frozen.
        dequant_experts: with MXFP4 experts, dequantise at most this many experts of a layer at a time
            (``limit_dense_experts``); 0 dequantises a whole layer at once. See ``check_dequant_experts``.

    Returns:
        The model in eval mode, its tokenizer and what was decided.

    Raises:
        OsstuneError: a missing folder, config, tokenizer or weight file, an unknown dtype or device, an attention
            implementation gpt-oss cannot use, a checkpoint transformers refuses, ``dequant_experts`` without
            MXFP4 experts, or an input embedding that cannot be kept in host RAM.
    """
    console = console or Console(stderr=True)
    model_dir = resolve_model_dir(str(model)).resolve()
    config = read_model_config(model_dir)
    check_weight_files(model_dir)
    gpt_oss = is_gpt_oss(config)
    dtype = resolve_dtype(torch_dtype, config)
    target = resolve_device(device)
    runs_on = resolve_device(compute_device) if compute_device else target
    attn = resolve_attn_impl(attn_impl, gpt_oss=gpt_oss, device=runs_on)
    tokenizer = load_tokenizer(model_dir)
    if offload_embeddings and runs_on.type != target.type:
        raise OsstuneError(f"--offload_embeddings true: the model loads on {target} to run on {runs_on} (ZeRO-3 or "
                           "FSDP place the weights themselves); the host-RAM embedding needs the model loaded where "
                           "it runs. Use --offload_embeddings false.")
    if not gpt_oss:
        _say(console, f"generic path: {config.get('model_type', 'unknown model type')}; "
                      "harmony-specific features are off")
    _report_memory(console, config, dtype, target)
    check_dequant_experts(dequant_experts, expert_weights)
    experts = resolve_expert_weights(expert_weights, config, dtype, target, console)
    if dequant_experts and experts != "mxfp4":
        _say(console, f"--dequant_experts {dequant_experts} does not apply: --expert_weights auto dequantised the "
                      "experts on load")
        dequant_experts = 0

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, "device_map": {"": target}}
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    try:
        with _quiet_transformers():
            if experts == "mxfp4":
                from osstune.models.gpt_oss.mxfp4_experts import load_mxfp4_model

                loaded = load_mxfp4_model(model_dir, check_weight_files(model_dir), dtype=dtype, attn_impl=attn,
                                          device=target)
            else:
                loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise OsstuneError(f"--model {model_dir}: transformers could not load the model ({exc}).") from None
    seconds = time.perf_counter() - start
    params = sum(param.numel() for param in loaded.parameters())
    dtype_name = str(dtype).removeprefix("torch.")
    _say(console, f"loaded {model_dir}: dtype {dtype_name}, attn {attn}, {_format_count(params)} params, "
                  f"{target}, {seconds:.1f}s" + (", experts kept as MXFP4" if experts == "mxfp4" else "")
                  + f"; peak host RAM {format_bytes(peak_host_bytes())}")
    if dequant_experts:
        layers = limit_dense_experts(loaded, dequant_experts)
        _say(console, f"MXFP4 experts dequantised {dequant_experts} at a time in each of {layers} layers")
    if offload_embeddings:
        from osstune.models.host_embedding import offload_input_embeddings

        table = offload_input_embeddings(loaded).weight
        _say(console, f"input embedding ({format_bytes(table.numel() * table.element_size())}) kept in host RAM; "
                      f"only each batch's rows go to {target}")
    return LoadedModel(
        model=loaded.eval(),
        tokenizer=tokenizer,
        model_dir=model_dir,
        config=config,
        is_gpt_oss=gpt_oss,
        attn_impl=attn,
        dtype=dtype,
        device=target,
        expert_weights=experts,
        offload_embeddings=offload_embeddings,
        dequant_experts=dequant_experts,
    )


def check_dequant_experts(dequant_experts: int, expert_weights: str) -> None:
    """Reject a ``--dequant_experts`` that cannot apply, before anything is loaded.

    Args:
        dequant_experts: MXFP4 experts dequantised at a time (0: a whole layer).
        expert_weights: the requested ``--expert_weights`` (``auto`` may still pick MXFP4, so it is accepted).

    Raises:
        OsstuneError: a negative count, or a positive one with ``--expert_weights bf16`` (nothing to dequantise).
    """
    if dequant_experts < 0:
        raise OsstuneError(f"--dequant_experts {dequant_experts}: give a number of experts (at least 1), or 0 to "
                           "dequantise a whole layer at once.")
    if dequant_experts and expert_weights == "bf16":
        raise OsstuneError(f"--dequant_experts {dequant_experts} bounds the on-the-fly dequantisation of experts "
                           "kept as MXFP4, but --expert_weights bf16 dequantises them all on load. Add "
                           "--expert_weights mxfp4, or leave --dequant_experts at 0.")


def limit_dense_experts(model: Any, count: int) -> int:
    """Bound the MXFP4 dequantisation scratch to ``count`` experts' worth of a layer (``max_dense_experts``).

    Args:
        model: a model loaded with ``expert_weights="mxfp4"`` (PEFT-wrapped or not).
        count: experts' worth of dense weights per dequantised slice; 0 dequantises a whole layer at once.

    Returns:
        How many expert layers were set.

    Raises:
        OsstuneError: a negative count, or a model without MXFP4 experts.
    """
    from osstune.models.gpt_oss.mxfp4_experts import Mxfp4Experts

    if count < 0:
        raise OsstuneError(f"--dequant_experts {count}: give a number of experts (at least 1), or 0.")
    layers = [module for module in model.modules() if isinstance(module, Mxfp4Experts)]
    if not layers:
        raise OsstuneError(f"--dequant_experts {count}: the model holds no MXFP4 experts; load it with "
                           "--expert_weights mxfp4.")
    for experts in layers:
        experts.max_dense_experts = count or None
    return len(layers)


def resolve_expert_weights(
    expert_weights: str, config: dict[str, Any], dtype: torch.dtype, device: torch.device, console: Console
) -> str:
    """How the gpt-oss experts are held once loaded: ``mxfp4`` or ``bf16`` (dense in the load dtype).

    Args:
        expert_weights: ``mxfp4``, ``bf16`` or ``auto``.
        config: the model's ``config.json``.
        dtype: the load dtype.
        device: the device the model is loaded onto.
        console: where ``auto`` says what it chose and why.

    Returns:
        ``mxfp4`` or ``bf16``. ``auto`` gives ``mxfp4`` for an MXFP4 gpt-oss checkpoint whose dense weights would
        not fit in the free memory of ``device``, else ``bf16``.

    Raises:
        OsstuneError: an unknown choice, or ``mxfp4`` for a model that is not an MXFP4 gpt-oss checkpoint.
    """
    from osstune.models.gpt_oss.mxfp4_experts import is_mxfp4_checkpoint

    if expert_weights not in EXPERT_WEIGHTS:
        raise OsstuneError(f"--expert_weights {expert_weights}: use one of {', '.join(EXPERT_WEIGHTS)}.")
    mxfp4 = is_gpt_oss(config) and is_mxfp4_checkpoint(config)
    if expert_weights == "mxfp4" and not mxfp4:
        raise OsstuneError("--expert_weights mxfp4: the model is not a gpt-oss checkpoint with MXFP4 experts (no "
                           "quantization_config with quant_method mxfp4); use --expert_weights bf16.")
    if expert_weights != "auto":
        return expert_weights
    if not mxfp4:
        return "bf16"
    need = estimate_load_bytes(config, dtype)
    free = free_memory_bytes(device)
    if free is not None and need > free:
        _say(console, f"--expert_weights auto: the dense weights (~{format_bytes(need)}) do not fit the "
                      f"{format_bytes(free)} free on {device}; keeping the experts as MXFP4")
        return "mxfp4"
    _say(console, "--expert_weights auto: the dense weights fit; dequantising the experts on load")
    return "bf16"


def _report_memory(console: Console, config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
    """Print the estimated weight memory against what ``device`` has free; warn (never refuse) when short.

    Args:
        console: where to print.
        config: the model's ``config.json``.
        dtype: the dtype the weights load in.
        device: the device they load onto.
    """
    try:
        need = estimate_load_bytes(config, dtype)
    except OsstuneError as exc:
        _say(console, f"memory: {exc}")
        return
    free = free_memory_bytes(device)
    where = "host RAM" if device.type == "cpu" else str(device)
    free_text = f"{format_bytes(free)} free on {where}" if free is not None else f"free {where} unknown"
    _say(console, f"memory: weights need ~{format_bytes(need)}; {free_text}")
    if free is not None and need > free:
        _say(console, f"warning: the weights alone need more than the {format_bytes(free)} free on {where}; "
                      "loading may fail or swap", style="yellow")


def _format_count(count: int) -> str:
    """A parameter count for people: 20.91B, 845.2K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def _say(console: Console, text: str, style: str | None = None) -> None:
    """Print one line verbatim (no markup or highlighting: paths may hold brackets)."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for the duration, restoring the previous settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
