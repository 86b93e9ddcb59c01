"""How much memory a model's weights need once loaded, and how much the target device has free.

The estimate counts parameters from ``config.json`` alone, before any weight is read: exactly for gpt-oss (every
tensor of ``GptOssForCausalLM``), and from the usual size keys for other decoder-only models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from osstune.errors import OsstuneError

MEMINFO = Path("/proc/meminfo")
"""Where Linux reports host memory; read when psutil is not installed."""


def count_parameters(config: dict[str, Any]) -> int:
    """Number of parameters of the causal LM described by a ``config.json``.

    gpt-oss is counted exactly: embeddings, per layer the q/k/v/o projections with biases, the attention sinks,
    two norms, the router (weight and bias) and the expert stacks ``gate_up_proj`` [E, H, 2I] and ``down_proj``
    [E, I, H] with their biases, then the final norm and ``lm_head``. Other models are estimated as a Llama-style
    decoder (gated MLP of three matrices, or ``num_local_experts``/``num_experts`` such MLPs plus a router),
    reading ``text_config`` when the model nests its language model there.

    Args:
        config: the parsed ``config.json``.

    Returns:
        The parameter count.

    Raises:
        OsstuneError: the config lacks the sizes needed (hidden size, layer count, vocabulary size).
    """
    if config.get("model_type") == "gpt_oss":
        return _count_gpt_oss(config)
    return _count_generic(config.get("text_config") or config)


def estimate_load_bytes(config: dict[str, Any], dtype: torch.dtype) -> int:
    """Bytes the model's weights take once loaded in ``dtype`` (MXFP4 experts are dequantised to it).

    Args:
        config: the parsed ``config.json``.
        dtype: the dtype every weight is loaded in.

    Returns:
        ``count_parameters(config)`` times the size of one element of ``dtype``.

    Raises:
        OsstuneError: the config lacks the sizes needed (see ``count_parameters``).
    """
    return count_parameters(config) * dtype.itemsize


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on a device.

    Args:
        device: a CUDA device (its free memory from ``torch.cuda.mem_get_info``) or the CPU (available host RAM,
            from psutil when installed, else ``/proc/meminfo``).

    Returns:
        Free bytes, or None when the platform does not say.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def format_bytes(count: float) -> str:
    """A byte count for people, in GiB (or MiB below one GiB).

    Args:
        count: bytes.
    """
    gib = count / 2**30
    return f"{gib:.1f} GiB" if gib >= 1 else f"{count / 2**20:.1f} MiB"


def _count_gpt_oss(config: dict[str, Any]) -> int:
    """Exact parameter count of ``GptOssForCausalLM`` for a gpt-oss config."""
    hidden = _size(config, "hidden_size")
    layers = _size(config, "num_hidden_layers")
    vocab = _size(config, "vocab_size")
    heads = _size(config, "num_attention_heads")
    kv_heads = _size(config, "num_key_value_heads")
    head_dim = int(config.get("head_dim") or hidden // heads)
    experts = _size(config, "num_local_experts")
    inter = _size(config, "intermediate_size")
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    bias = bool(config.get("attention_bias", True))
    attention = (
        hidden * q_width + 2 * hidden * kv_width + q_width * hidden
        + (q_width + 2 * kv_width + hidden if bias else 0)
        + heads  # sinks
    )
    router = experts * hidden + experts
    expert_stacks = experts * (hidden * 2 * inter + 2 * inter) + experts * (inter * hidden + hidden)
    per_layer = attention + router + expert_stacks + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head


def _count_generic(config: dict[str, Any]) -> int:
    """Parameter estimate of a Llama-style decoder from the common config keys."""
    hidden = _size(config, "hidden_size", "n_embd", "d_model")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _size(config, "vocab_size")
    heads = int(_first(config, "num_attention_heads", "n_head") or max(1, hidden // 64))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(_first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden)
    experts = int(_first(config, "num_local_experts", "num_experts") or 0)
    expert_inter = int(config.get("moe_intermediate_size") or inter)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    if config.get("attention_bias"):
        attention += q_width + 2 * kv_width + hidden
    mlp = experts * (3 * hidden * expert_inter) + experts * hidden if experts else 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head


def _first(config: dict[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` that the config sets (not None), else None."""
    return next((config[key] for key in keys if config.get(key) is not None), None)


def _size(config: dict[str, Any], *keys: str) -> int:
    """A required positive size from the config, under the first of ``keys`` it sets.

    Raises:
        OsstuneError: none of the keys is set to a positive integer.
    """
    value = _first(config, *keys)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OsstuneError(f"config.json has no usable {' / '.join(keys)}; the memory need cannot be estimated")
    return value


def _meminfo_available() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where that file does not exist or lacks it."""
    try:
        lines = MEMINFO.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            return int(rest.split()[0]) * 1024
    return None
