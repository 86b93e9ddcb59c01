"""How much memory a model needs, loaded and in training, and how much the target device has free.

The estimates read ``config.json`` alone, before any weight is read. Loading: parameters counted exactly for gpt-oss
(every tensor of ``GptOssForCausalLM``), and from the usual size keys for other decoder-only models. Training
(:func:`estimate_training_memory`): per-GPU weights under each sharding engine, LoRA parameters with their gradients
and AdamW state, activations counted tensor by tensor for the configured checkpointing, and the logits at the loss.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.experts import GROUPED_MM_ALIGN_BYTES
from osstune.train.host_optimizer import BUCKET_BYTES

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


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``), in bytes: its high-water mark of host RAM."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


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


ENGINES: tuple[str, ...] = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload")
"""How training is spread over processes, for the memory estimate: ``ddp`` (also one process) replicates
everything; ``zero2`` shards gradients and optimizer state; ``zero3`` and ``fsdp`` also shard the weights; the
``_offload`` variants keep weights, gradients and optimizer state in host RAM."""

MXFP4_BYTES = 17 / 32
"""Bytes per MXFP4 weight: half a byte of code plus one scale byte per block of 32."""

ADAPTER_BYTES = 4
"""Bytes per LoRA parameter: PEFT keeps adapters in float32 under a bfloat16/float16 base."""

ADAMW_BYTES = 8
"""Bytes of AdamW state per trained parameter: two float32 moments."""

HOST_OPTIMIZER_BYTES = 2 * BUCKET_BYTES
"""Device bytes of AdamW state with the moments in host RAM: the two buckets ``HostAdamW`` streams at a time."""

INDEX_BYTES = 8
"""Bytes of one int64 index (routing and softmax bookkeeping saved for the backward pass)."""

FP32_BYTES = 4
"""Bytes of one float32 value (RMSNorm statistics, the loss, attention log-sum-exp)."""

ATTENTION_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The linear layers of an attention block, by their usual module names."""


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of the model being trained (from a model built on the meta device: no weights read).

    Args:
        frozen: parameters of the base model on the device, which are not trained.
        trainable: LoRA (and ``modules_to_save``) parameters.
        largest_unit: parameters of the largest piece that weight sharding gathers at once: a decoder layer, the
            embedding or the output head.
        host: frozen parameters kept in host RAM instead (the input embedding with ``--offload_embeddings``);
            not part of ``frozen``, and not counted by the per-GPU estimate.
        packed: frozen expert weights held as MXFP4 codes (``--expert_weights mxfp4``), ``MXFP4_BYTES`` each; not
            part of ``frozen``.
        scratch: expert weights dequantised at once from ``packed`` (one layer's largest stack, or
            ``--dequant_experts`` experts of it), counted with the gathered layers.
    """

    frozen: int
    trainable: int
    largest_unit: int
    host: int = 0
    packed: int = 0
    scratch: int = 0


@dataclass(frozen=True)
class LoraLayout:
    """Where LoRA sits in each decoder layer, as far as activation memory is concerned.

    Args:
        rank: LoRA rank r.
        attention: the attention projections that carry LoRA (names from :data:`ATTENTION_PROJECTIONS`).
        expert_layers: layers whose expert stacks (gpt-oss) carry LoRA.
        router: whether the router (gpt-oss) carries LoRA.
        mlp: for dense models, whether the MLP projections carry LoRA.
    """

    rank: int
    attention: tuple[str, ...] = ATTENTION_PROJECTIONS
    expert_layers: frozenset[int] = frozenset()
    router: bool = False
    mlp: bool = False


@dataclass(frozen=True)
class TrainingShape:
    """What one micro-step processes on one GPU.

    Args:
        micro_batch: sequences per device per micro-step (``--per_device_train_batch_size``).
        seq_len: tokens per sequence (``--max_length``, or the longest sample).
        checkpointing: activation checkpointing of the decoder layers (``--gradient_checkpointing``).
        attn_impl: ``eager`` materialises the attention probabilities; ``flex_attention`` and ``sdpa`` do not.
        fused_loss: liger's fused linear cross-entropy (``--use_liger_kernel``) never materialises the logits.
        fused_norm: liger's RMSNorm (``--use_liger_kernel``) saves its input in the compute dtype, not a float32
            copy.
        checkpointed_layers: with ``checkpointing``, the indices of the decoder layers checkpointed (None: every
            layer); see :mod:`osstune.train.checkpointing`.
        offload: the inputs of checkpointed layers are held in host RAM (``--offload_activations``).
    """

    micro_batch: int
    seq_len: int
    checkpointing: bool
    attn_impl: str = "flex_attention"
    fused_loss: bool = False
    fused_norm: bool = False
    checkpointed_layers: frozenset[int] | None = None
    offload: bool = False

    @property
    def tokens(self) -> int:
        """Tokens per micro-step on one GPU."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of one training process, by component, in bytes.

    Args:
        weights: the frozen base weights resident on the GPU (a shard under ZeRO-3/FSDP, none when offloaded).
        gathered: base weights gathered for the unit being computed plus the one prefetched (ZeRO-3/FSDP only).
        lora: the trainable adapter parameters (float32).
        gradients: their gradients (float32).
        optimizer: AdamW's two float32 moments.
        activations: tensors saved for the backward pass (a checkpointed layer keeps its input, on the device
            unless offloaded, and one is recomputed at a time), and eager attention's masks.
        logits: the output logits at the loss (none with a fused loss).
    """

    weights: int
    gathered: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        """Sum of the components."""
        return sum(bytes_ for _, bytes_ in self.rows())

    def rows(self) -> list[tuple[str, int]]:
        """``(component, bytes)`` in table order (without the total)."""
        return [("weights", self.weights), ("gathered layers", self.gathered), ("LoRA parameters", self.lora),
                ("gradients", self.gradients), ("AdamW state", self.optimizer), ("activations", self.activations),
                ("logits", self.logits)]


def estimate_training_memory(
    config: dict[str, Any],
    *,
    dtype: torch.dtype,
    counts: ModelCounts,
    lora: LoraLayout,
    shape: TrainingShape,
    engine: str = "ddp",
    world_size: int = 1,
    host_optimizer: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of one GPU while training LoRA.

    Weights take ``dtype``; adapters, their gradients and AdamW state are float32 (4 + 4 + 8 bytes per trained
    parameter). Sharding divides by ``world_size`` (rounding up): gradients and optimizer state under ``zero2``;
    everything under ``zero3``/``fsdp``, which also hold two gathered units (the one computing and the one
    prefetched); ``*_offload`` keeps the sharded state in host RAM. Activations follow
    :func:`activation_bytes`; the logits take ``tokens x vocab x (dtype bytes + 8)``: the logits in ``dtype`` plus
    two float32 tensors of that size at the loss (upcast logits and log-softmax forward, their gradients backward).
    Allocator fragmentation, CUDA context and communication buffers are not included.

    Args:
        config: the model's ``config.json``.
        dtype: the compute dtype of the weights.
        counts: parameter counts (see :class:`ModelCounts`).
        lora: where LoRA sits (see :class:`LoraLayout`).
        shape: the micro-batch (see :class:`TrainingShape`).
        engine: one of :data:`ENGINES`.
        world_size: processes training together.
        host_optimizer: AdamW's moments live in host RAM (``--offload_optimizer``): the device holds only the two
            buckets in flight (``HOST_OPTIMIZER_BYTES``).

    Raises:
        OsstuneError: an unknown engine, a world size below 1, or a config without the sizes needed.
    """
    if engine not in ENGINES:
        raise OsstuneError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if world_size < 1:
        raise OsstuneError(f"world size {world_size}: must be at least 1")
    width = dtype.itemsize
    offload = engine.endswith("_offload")
    shards_weights = engine.startswith(("zero3", "fsdp"))
    shards_state = shards_weights or engine == "zero2"

    def share(count: int, sharded: bool) -> int:
        return 0 if offload else -(-count // world_size) if sharded else count

    vocab = _size(config.get("text_config") or config, "vocab_size")
    return MemoryEstimate(
        weights=share(counts.frozen * width + math.ceil(counts.packed * MXFP4_BYTES), shards_weights),
        gathered=(2 * counts.largest_unit * width if shards_weights else 0) + counts.scratch * width,
        lora=share(counts.trainable * ADAPTER_BYTES, shards_weights),
        gradients=share(counts.trainable * ADAPTER_BYTES, shards_state),
        optimizer=(min(HOST_OPTIMIZER_BYTES, counts.trainable * ADAMW_BYTES) if host_optimizer
                   else share(counts.trainable * ADAMW_BYTES, shards_state)),
        activations=activation_bytes(config, lora=lora, shape=shape, dtype_bytes=width),
        logits=0 if shape.fused_loss else shape.tokens * vocab * (width + 2 * FP32_BYTES),
    )


def activation_bytes(config: dict[str, Any], *, lora: LoraLayout, shape: TrainingShape, dtype_bytes: int) -> int:
    """Bytes of activations one micro-step keeps on the device for the backward pass, at their peak.

    A decoder layer that is not checkpointed keeps its saved tensors (:func:`layer_activation_bytes`); a
    checkpointed one keeps only its input (hidden size x dtype bytes per token; nothing with ``shape.offload``), and
    one checkpointed layer at a time is recomputed (see :func:`kept_activation_bytes`). Add the model's tail and
    eager attention's masks (:func:`activation_overhead_bytes`).

    Args:
        config: the model's ``config.json``.
        lora: where LoRA sits.
        shape: the micro-batch and which layers are checkpointed.
        dtype_bytes: bytes per element of the compute dtype.
    """
    full, inputs = layer_activation_sizes(config, lora=lora, shape=shape, dtype_bytes=dtype_bytes)
    if not shape.checkpointing:
        checkpointed: frozenset[int] = frozenset()
    elif shape.checkpointed_layers is None:
        checkpointed = frozenset(range(len(full)))
    else:
        checkpointed = shape.checkpointed_layers
    return (kept_activation_bytes(full, inputs, checkpointed, offload=shape.offload)
            + activation_overhead_bytes(config, shape=shape, dtype_bytes=dtype_bytes))


def kept_activation_bytes(full: Sequence[int], inputs: Sequence[int], checkpointed: Collection[int], *,
                          offload: bool) -> int:
    """Peak device bytes the decoder layers keep for the backward pass, given which of them are checkpointed.

    Every layer that is not checkpointed keeps all it saves; a checkpointed one keeps its input (unless offloaded to
    host RAM), and while the backward pass recomputes one checkpointed layer, that layer's saved tensors exist
    again: the largest such layer is counted once.

    Args:
        full: per layer, the bytes it saves for the micro-batch when not checkpointed.
        inputs: per layer, the bytes of its input (what a checkpointed layer keeps).
        checkpointed: indices of the checkpointed layers.
        offload: the inputs of checkpointed layers live in host RAM.
    """
    kept = sum(size for index, size in enumerate(full) if index not in checkpointed)
    if not checkpointed:
        return kept
    stored = 0 if offload else sum(inputs[index] for index in checkpointed)
    return kept + stored + max(full[index] for index in checkpointed)


def layer_activation_sizes(config: dict[str, Any], *, lora: LoraLayout, shape: TrainingShape,
                           dtype_bytes: int) -> tuple[list[int], list[int]]:
    """Per decoder layer, the bytes one micro-step saves for the backward pass: ``(full, inputs)``.

    ``full[i]`` is what layer ``i`` saves when not checkpointed (:func:`layer_activation_bytes` times the tokens of
    the micro-batch); ``inputs[i]`` is its input, all that it keeps when checkpointed.

    Args:
        config: the model's ``config.json``.
        lora: where LoRA sits.
        shape: the micro-batch (its checkpointing fields are not read).
        dtype_bytes: bytes per element of the compute dtype.
    """
    text = config.get("text_config") or config
    hidden = _size(text, "hidden_size", "n_embd", "d_model")
    layers = _size(text, "num_hidden_layers", "n_layer", "num_layers")
    full = [shape.tokens * layer_activation_bytes(config, layer=i, lora=lora, seq_len=shape.seq_len,
                                                  dtype_bytes=dtype_bytes, attn_impl=shape.attn_impl,
                                                  fused_norm=shape.fused_norm)
            for i in range(layers)]
    return full, [shape.tokens * hidden * dtype_bytes] * layers


def activation_overhead_bytes(config: dict[str, Any], *, shape: TrainingShape, dtype_bytes: int) -> int:
    """Activation bytes outside the decoder layers: the model's tail (final RMSNorm statistics, token ids, rotary
    tables) and, for eager attention, its two ``[batch, seq, seq]`` masks (causal and sliding window).

    Args:
        config: the model's ``config.json``.
        shape: the micro-batch.
        dtype_bytes: bytes per element of the compute dtype.
    """
    text = config.get("text_config") or config
    hidden = _size(text, "hidden_size", "n_embd", "d_model")
    heads = int(_first(text, "num_attention_heads", "n_head") or max(1, hidden // 64))
    head_dim = int(text.get("head_dim") or hidden // heads)
    tail = FP32_BYTES * hidden + FP32_BYTES + INDEX_BYTES + head_dim * dtype_bytes
    masks = 2 * shape.micro_batch * shape.seq_len ** 2 * dtype_bytes if shape.attn_impl == "eager" else 0
    return shape.tokens * tail + masks


def norm_bytes(hidden: int, dtype_bytes: int, fused: bool) -> int:
    """Per-token bytes an RMSNorm saves for the backward pass: its input as a float32 copy and the float32
    statistic (transformers' eager RMSNorm), or its input in the compute dtype and the statistic (liger's fused
    RMSNorm, ``fused``).

    Args:
        hidden: the normalised width.
        dtype_bytes: bytes per element of the compute dtype.
        fused: liger's RMSNorm.
    """
    return (dtype_bytes if fused else FP32_BYTES) * hidden + FP32_BYTES


def layer_activation_bytes(config: dict[str, Any], *, layer: int, lora: LoraLayout, seq_len: int, dtype_bytes: int,
                           attn_impl: str, fused_norm: bool = False) -> int:
    """Bytes per token that one decoder layer saves for the backward pass, counted tensor by tensor.

    Frozen projections save nothing about their input (only trained weights need it); each LoRA projection saves
    its input and its rank-r intermediate; projections that share an input share the saved tensor (osstune runs
    the update in the input's dtype, ``lora_linear``). Per token, with b bytes per element, H hidden, r rank:

    - attention: RMSNorm ``4H + 4`` (float32 input and statistic; ``H * b + 4`` for liger's, ``norm_bytes``);
      LoRA inputs and ``r * b`` intermediates;
      eager: query, repeated keys and values ``3 * heads * head_dim * b``, int64 max indices per head and the
      probabilities ``heads * (seq + 1) * b``; flex/sdpa: query, keys, values, output and per-head log-sum-exp;
    - gpt-oss experts, per routed (token, expert) pair (K per token): two int64 indices (expert and pair of each
      row), the gate/up output ``2I * b`` (all the fused bias + LoRA + clamp-SwiGLU keeps), the
      expert output ``H * b`` (the fused combine keeps it for the routing weights' gradient), plus, with expert
      LoRA, two rank-r intermediates (r rounded up to 16-byte rows, as the grouped kernel pads it) and, once per
      token, the layer's expert input ``H * b`` (shared with a router LoRA): the LoRA factors' gradients gather
      the expert rows again from it and recompute the activation from the gate/up output (``Rebuild``); the
      router's top-k indices and weights (experts with and without LoRA both run osstune's fused expert pass);
    - dense gated MLP (other models): gate output, its activation and the up output ``3I * b``, plus, with LoRA,
      the shared gate/up input, the down input ``I * b`` and three intermediates.

    Args:
        config: the model's ``config.json``.
        layer: the layer's index (expert LoRA may sit on some layers only).
        lora: where LoRA sits.
        seq_len: tokens per sequence (eager attention's probabilities grow with it).
        dtype_bytes: bytes per element of the compute dtype.
        attn_impl: ``eager``, ``flex_attention`` or ``sdpa``.
        fused_norm: liger's RMSNorm (see :class:`TrainingShape`).
    """
    text = config.get("text_config") or config
    b, r = dtype_bytes, lora.rank
    hidden = _size(text, "hidden_size", "n_embd", "d_model")
    heads = int(_first(text, "num_attention_heads", "n_head") or max(1, hidden // 64))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    norm = norm_bytes(hidden, b, fused_norm)
    qkv = [name for name in ("q_proj", "k_proj", "v_proj") if name in lora.attention]
    attention = norm + min(len(qkv), 1) * hidden * b + len(lora.attention) * r * b
    if "o_proj" in lora.attention:
        attention += q_width * b
    if attn_impl == "eager":
        attention += 3 * q_width * b + INDEX_BYTES * heads + heads * (seq_len + 1) * b
    else:
        attention += (2 * q_width + 2 * kv_width) * b + heads * (FP32_BYTES + 3 * b)
    if config.get("model_type") == "gpt_oss":
        return attention + norm + _experts_bytes(text, layer in lora.expert_layers, lora.router, r, b)
    inter = int(_first(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden)
    mlp = norm + 3 * inter * b
    if lora.mlp:
        mlp += (hidden + inter) * b + 3 * r * b
    return attention + mlp


def _experts_bytes(config: dict[str, Any], expert_lora: bool, router_lora: bool, rank: int, b: int) -> int:
    """Per-token bytes the gpt-oss router and experts save for the backward pass (see layer_activation_bytes)."""
    hidden = _size(config, "hidden_size")
    inter = _size(config, "intermediate_size")
    top_k = _size(config, "num_experts_per_tok", "experts_per_token")
    router = top_k * (INDEX_BYTES + b) + (rank * b if router_lora else 0)
    shared_input = hidden * b if router_lora or expert_lora else 0  # the layer's expert input, kept once
    pair = 2 * INDEX_BYTES + 2 * inter * b + hidden * b
    if expert_lora:
        multiple = max(1, GROUPED_MM_ALIGN_BYTES // b)  # the grouped kernel pads the rank to 16-byte rows
        pair += 2 * (-(-rank // multiple) * multiple) * b
    return router + shared_input + top_k * pair
