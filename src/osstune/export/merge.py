"""Merging a LoRA checkpoint into its base model, streamed tensor by tensor into sharded safetensors.

Which base tensor each adapter tensor changes, and by how much, is PEFT's own answer: the adapter's
``LoraConfig`` is applied to an empty (meta-device) copy of the base model, and every LoRA layer PEFT creates
there names its saved keys, its target tensor and its scaling (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA,
``alpha_pattern`` and ``rank_pattern`` included). The updates are PEFT's ``get_delta_weight``:

- a linear module (attention ``q/k/v/o_proj``): ``W [out, in] += scaling * B @ A`` (transposed with
  ``fan_in_fan_out``), and with ``lora_bias`` ``b += scaling * lora_B.bias``;
- an embedding: ``W [num, dim] += scaling * (B @ A)^T``;
- a 2-D parameter target (the gpt-oss router weight ``[E, H]``): as a linear module;
- a 3-D parameter target (the expert stacks ``[E, in, out]``): expert e gets ``scaling * A_e^T @ B_e^T`` with
  ``A_e = lora_A[e*r:(e+1)*r]`` and ``B_e = lora_B[:, e::E]`` (see ``osstune.models.gpt_oss.moe_lora``);
- full tensors saved with the adapter (``modules_to_save``, resized embeddings) replace the base tensor first.

Memory: output shards are planned from the safetensors headers before any weight is read, each shard's header is
written first and its tensors are streamed into it as they are computed, so no shard is ever held in memory. A
tensor read with ``safe_open`` is a view of the mapped file, released when the tensor is dropped; expert stacks are
merged and (re)quantised one expert at a time. Peak resident memory is therefore

    baseline + max over tensors (source bytes + output bytes) + 12 * in * out bytes (one expert, float32) + ~10 MB

where ``baseline`` is the process with torch, transformers and PEFT imported (~0.37 GB) and the last term is the
empty PEFT model and bookkeeping. It depends on neither the shard size nor the model size. Measured (VmHWM): a
100 MiB model exported in 16MB shards grew the process by 20 MiB in bfloat16 (largest tensor 8 MiB, largest shard
15 MiB), by 26 MiB in float32 (200 MiB written), by 17 MiB with MXFP4 experts.
For gpt-oss-20b in bfloat16 the largest term is an expert stack (1.06 GB out, 0.28 GB of MXFP4 in, 0.2 GB of
float32 temporaries): about 1.6 GB above the baseline (3.5 GB in float32, from the embeddings), against 10 GB for
two 5GB shards.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4
from osstune.models.safetensors_shards import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    OutputTensor,
    ShardWriter,
    shard_plan,
)

SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
"""``--max_shard_size`` units: decimal (KB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB), as Hugging Face reads them."""

PEFT_PREFIX = "base_model.model."
"""Prefix of every key in a saved PEFT adapter."""

MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
"""Suffixes of the two uint8 tensors that store one MXFP4 expert stack in a checkpoint."""

GPT_OSS_EXPERT_STACK = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
"""Dense names of the gpt-oss expert weight stacks, the tensors MXFP4 stores."""



def parse_size(text: str | int) -> int:
    """Bytes meant by a size such as ``5GB``, ``500MB``, ``1.5GiB`` or ``1000000``.

    Args:
        text: a number of bytes, optionally with a unit (see ``SIZE_UNITS``; case-insensitive).

    Raises:
        OsstuneError: not a size, or not positive.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise OsstuneError(f"--max_shard_size {text}: not a size; write it like 5GB, 500MB or 2GiB.")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise OsstuneError(f"--max_shard_size {text}: must be at least one byte.")
    return size


# --------------------------------------------------------------------------------------------------------------------
# The base checkpoint, seen as dense tensors.


@dataclass(frozen=True)
class BaseTensor:
    """One weight of the base checkpoint, as the model sees it (MXFP4 experts as their dense stack).

    Args:
        name: the dense name, e.g. ``model.layers.0.mlp.experts.gate_up_proj``.
        shape: the dense shape (``[E, in, out]`` for an MXFP4 expert stack).
        dtype: the stored dtype (``torch.uint8`` for an MXFP4 stack, whose values are exact in bfloat16).
        file: the shard holding it (the ``*_blocks`` tensor for MXFP4).
        scales_file: for an MXFP4 stack, the shard holding its ``*_scales``; None for a plain tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    scales_file: Path | None = None

    @property
    def mxfp4(self) -> bool:
        """Whether the tensor is stored as MXFP4 blocks and scales."""
        return self.scales_file is not None

    def read(self) -> torch.Tensor:
        """The stored tensor (a view of the mapped file; for MXFP4 use ``read_mxfp4``)."""
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self.name)

    def read_mxfp4(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(blocks, scales)`` uint8 tensors of an MXFP4 expert stack."""
        assert self.scales_file is not None, f"{self.name} is not stored as MXFP4"
        with safe_open(str(self.file), framework="pt") as f:
            blocks = f.get_tensor(self.name + MXFP4_BLOCKS)
        with safe_open(str(self.scales_file), framework="pt") as f:
            scales = f.get_tensor(self.name + MXFP4_SCALES)
        return blocks, scales


def read_base_tensors(shards: list[Path]) -> dict[str, BaseTensor]:
    """Index the base checkpoint's weights by dense name, from the safetensors headers only.

    Args:
        shards: the checkpoint's safetensors files (see ``osstune.models.loading.check_weight_files``).

    Returns:
        ``{dense name: BaseTensor}``; an MXFP4 pair ``X_blocks``/``X_scales`` becomes one entry ``X``.

    Raises:
        OsstuneError: a weight stored twice, an MXFP4 half without its other half, or blocks and scales whose
            shapes do not belong together.
    """
    found: dict[str, tuple[Path, str, list[int]]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key in found:
                    raise OsstuneError(f"{shard}: tensor {key} is also stored in {found[key][0]}.")
                part = f.get_slice(key)
                found[key] = (shard, part.get_dtype(), list(part.get_shape()))
    tensors: dict[str, BaseTensor] = {}
    for key, (shard, code, shape) in found.items():
        if key.endswith(MXFP4_SCALES) and key.removesuffix(MXFP4_SCALES) + MXFP4_BLOCKS in found:
            continue
        if key.endswith(MXFP4_BLOCKS) and key.removesuffix(MXFP4_BLOCKS) + MXFP4_SCALES in found:
            name = key.removesuffix(MXFP4_BLOCKS)
            scales_file, _, scales_shape = found[name + MXFP4_SCALES]
            if len(shape) != 4 or shape[-1] != BLOCK_SIZE // 2 or shape[:-1] != scales_shape:
                raise OsstuneError(f"{shard}: {key} {shape} and {name}{MXFP4_SCALES} {scales_shape} are not an "
                                   "MXFP4 pair ([E, rows, groups, 16] and [E, rows, groups]).")
            experts, rows, groups, _ = shape
            tensors[name] = BaseTensor(name, (experts, groups * BLOCK_SIZE, rows), torch.uint8, shard, scales_file)
            continue
        if code not in SAFETENSORS_DTYPES:
            raise OsstuneError(f"{shard}: tensor {key} has dtype {code}, which osstune cannot export.")
        tensors[key] = BaseTensor(key, tuple(shape), SAFETENSORS_DTYPES[code], shard)
    return tensors


# --------------------------------------------------------------------------------------------------------------------
# The adapter, read through PEFT's own layer construction.


@dataclass(frozen=True)
class LoraUpdate:
    """One low-rank update of a base tensor, as PEFT's ``get_delta_weight`` computes it.

    Args:
        tensor: the dense base tensor it changes.
        kind: ``linear`` (also 2-D parameter targets), ``embedding`` or ``experts`` (a 3-D parameter target).
        key_a: adapter key of ``lora_A`` (``lora_embedding_A`` for an embedding).
        key_b: adapter key of ``lora_B`` (``lora_embedding_B`` for an embedding).
        rank: the layer's LoRA rank ``r`` (``rank_pattern`` applied).
        scaling: PEFT's scaling of this layer.
        transposed: for ``linear``, PEFT's ``fan_in_fan_out`` (the weight is ``[in, out]``); for ``experts``, a
            stack stored ``[E, out, in]`` (PEFT swapped in and out features) instead of ``[E, in, out]``.
    """

    tensor: str
    kind: Literal["linear", "embedding", "experts"]
    key_a: str
    key_b: str
    rank: int
    scaling: float
    transposed: bool = False


@dataclass(frozen=True)
class BiasUpdate:
    """A ``lora_bias`` update: ``bias += scaling * lora_B.bias``.

    Args:
        tensor: the base bias tensor.
        key: adapter key of ``lora_B.bias``.
        scaling: PEFT's scaling of the layer.
    """

    tensor: str
    key: str
    scaling: float


@dataclass
class AdapterPlan:
    """What an adapter does to its base model, tensor by tensor.

    Args:
        file: the adapter's ``adapter_model.safetensors``.
        config: its ``adapter_config.json``.
        updates: low-rank updates by base tensor name.
        biases: ``lora_bias`` updates by base tensor name.
        replacements: base tensor name -> adapter key of a full tensor saved with the adapter.
    """

    file: Path
    config: dict[str, Any]
    updates: dict[str, list[LoraUpdate]] = field(default_factory=dict)
    biases: dict[str, list[BiasUpdate]] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)

    def changes(self, name: str) -> bool:
        """Whether the adapter changes the base tensor ``name``."""
        return name in self.updates or name in self.biases or name in self.replacements


def plan_adapter(adapter_dir: Path, base_dir: Path, base: dict[str, BaseTensor]) -> AdapterPlan:
    """Map every tensor of a PEFT LoRA adapter to the base tensor it changes, and check that the shapes fit.

    Args:
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_dir: the base model folder (its ``config.json`` builds the empty model PEFT is applied to).
        base: the base checkpoint's tensors (``read_base_tensors``).

    Returns:
        The plan.

    Raises:
        OsstuneError: an adapter type other than plain LoRA (DoRA and other variants, other layer types), adapter
            tensors missing or matching nothing in the base, or a shape that does not fit the base (the message
            names the tensor, both shapes and the base the adapter was trained on).
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    trained_on = config.get("base_model_name_or_path") or "another base model"
    if config.get("peft_type", "LORA") != "LORA":
        raise OsstuneError(f"--adapters {adapter_dir}: a {config.get('peft_type')} adapter; export merges LoRA only.")
    if config.get("use_dora"):
        raise OsstuneError(f"--adapters {adapter_dir}: DoRA adapters are not supported by export; merge plain LoRA.")
    plan = AdapterPlan(file=adapter_dir / "adapter_model.safetensors", config=config)
    claimed: set[str] = set()
    for module_name, layer in _peft_lora_layers(adapter_dir, base_dir):
        claimed |= _plan_layer(plan, module_name, layer)
    with safe_open(str(plan.file), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    missing = sorted(claimed - set(shapes))
    if missing:
        raise OsstuneError(f"--adapters {adapter_dir}: adapter_model.safetensors lacks {missing[0]} "
                           f"({len(missing)} LoRA tensors that adapter_config.json implies are absent); the "
                           "checkpoint is incomplete.")
    for key in sorted(set(shapes) - claimed):
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        if name not in base:
            raise OsstuneError(f"--adapters {adapter_dir} does not fit the model {base_dir}: its tensor {key} "
                               f"matches nothing in the base checkpoint (trained on {trained_on}). Pass the "
                               "matching --model.")
        plan.replacements[name] = key
    _check_shapes(plan, shapes, base, adapter_dir, base_dir, trained_on)
    return plan


def _peft_lora_layers(adapter_dir: Path, base_dir: Path) -> Iterator[tuple[str, Any]]:
    """The LoRA layers PEFT creates for the adapter's config on an empty copy of the base model.

    Args:
        adapter_dir: the adapter folder.
        base_dir: the base model folder.

    Yields:
        ``(module name as saved, PEFT LoRA layer)``.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config  # the merged model is dense; PEFT sees the dequantised shapes
    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    lora_config.inference_mode = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers warn about things that do not apply on meta
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(model_config)
        try:
            peft_model = get_peft_model(empty, lora_config, low_cpu_mem_usage=True)
        except ValueError as exc:
            raise OsstuneError(f"--adapters {adapter_dir} does not fit the model {base_dir}: {exc}") from None
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _plan_layer(plan: AdapterPlan, module_name: str, layer: Any) -> set[str]:
    """Add one PEFT LoRA layer's updates to ``plan``; returns the adapter keys it accounts for.

    Args:
        plan: the plan being built.
        module_name: the layer's name in the PEFT model (``base_model.model.`` prefix, ``base_layer`` nesting).
        layer: the PEFT layer (``Linear``, ``Embedding`` or ``ParamWrapper``).

    Raises:
        OsstuneError: a layer type or LoRA variant export cannot merge.
    """
    from peft.tuners.lora.layer import Embedding, Linear, ParamWrapper

    adapter = "default"
    if adapter not in layer.scaling:
        return set()
    if getattr(layer, "lora_variant", {}).get(adapter) is not None:
        raise OsstuneError(f"{module_name}: LoRA variants (DoRA and others) are not supported by export.")
    target = module_name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
    rank, scaling = int(layer.r[adapter]), float(layer.scaling[adapter])
    if isinstance(layer, Embedding):
        update = LoraUpdate(f"{target}.weight", "embedding", f"{module_name}.lora_embedding_A",
                            f"{module_name}.lora_embedding_B", rank, scaling)
    elif isinstance(layer, ParamWrapper):
        experts = layer.num_experts > 1
        update = LoraUpdate(f"{target}.{layer.parameter_name}", "experts" if experts else "linear",
                            f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight", rank, scaling,
                            transposed=bool(layer._did_swap_in_out_features) if experts else False)
    elif isinstance(layer, Linear):
        update = LoraUpdate(f"{target}.weight", "linear", f"{module_name}.lora_A.weight",
                            f"{module_name}.lora_B.weight", rank, scaling, transposed=bool(layer.fan_in_fan_out))
    else:
        raise OsstuneError(f"{module_name}: a LoRA layer of type {type(layer).__name__}, which export cannot merge.")
    plan.updates.setdefault(update.tensor, []).append(update)
    keys = {update.key_a, update.key_b}
    if layer.lora_bias.get(adapter):
        bias = BiasUpdate(f"{target}.bias", f"{module_name}.lora_B.bias", scaling)
        plan.biases.setdefault(bias.tensor, []).append(bias)
        keys.add(bias.key)
    return keys


def _check_shapes(plan: AdapterPlan, shapes: dict[str, tuple[int, ...]], base: dict[str, BaseTensor],
                  adapter_dir: Path, base_dir: Path, trained_on: str) -> None:
    """Check every adapter tensor's shape against the base tensor it changes, before anything is written.

    Args:
        plan: the adapter plan.
        shapes: adapter key -> shape.
        base: the base checkpoint's tensors.
        adapter_dir: the adapter folder (for messages).
        base_dir: the base model folder (for messages).
        trained_on: the base recorded in the adapter config (for messages).

    Raises:
        OsstuneError: the first misfit, naming the adapter tensor, its shape, the base tensor and its shape.
    """
    def misfit(key: str, expected: str, tensor: str) -> OsstuneError:
        return OsstuneError(
            f"--adapters {adapter_dir} does not fit the model {base_dir}: {key} has shape {list(shapes[key])} but "
            f"the base tensor {tensor} {list(base[tensor].shape)} needs {expected}. The adapter was trained on "
            f"{trained_on}; pass the matching --model.")

    for tensor, key in plan.replacements.items():
        if shapes[key] != base[tensor].shape:
            raise misfit(key, str(list(base[tensor].shape)), tensor)
    for tensor, updates in plan.updates.items():
        if tensor not in base:
            raise OsstuneError(f"--adapters {adapter_dir}: LoRA changes {tensor}, which the base checkpoint of "
                               f"{base_dir} does not store (tied or renamed weights cannot be merged).")
        for update in updates:
            expected = _factor_shapes(update, base[tensor].shape)
            if expected is None:
                raise misfit(update.key_a, "a LoRA for a tensor of another rank (2-D or 3-D)", tensor)
            for key, shape in zip((update.key_a, update.key_b), expected):
                if shapes[key] != shape:
                    raise misfit(key, str(list(shape)), tensor)
    for tensor, biases in plan.biases.items():
        if tensor not in base:
            raise OsstuneError(f"--adapters {adapter_dir}: lora_bias changes {tensor}, which the base model lacks.")
        for bias in biases:
            if shapes[bias.key] != base[tensor].shape:
                raise misfit(bias.key, str(list(base[tensor].shape)), tensor)


def _factor_shapes(update: LoraUpdate, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shapes ``lora_A`` and ``lora_B`` must have to update a base tensor of ``shape`` (None: no LoRA of this
    kind fits a tensor with that many dimensions).

    Args:
        update: the update (its kind, rank and orientation).
        shape: the dense base tensor's shape.
    """
    rank = update.rank
    if update.kind == "experts":
        if len(shape) != 3:
            return None
        experts, first, second = shape
        in_features, out_features = (second, first) if update.transposed else (first, second)
        return (rank * experts, in_features), (out_features, rank * experts)
    if len(shape) != 2:
        return None
    if update.kind == "embedding":
        num, dim = shape
        return (rank, num), (dim, rank)
    out_features, in_features = (shape[1], shape[0]) if update.transposed else shape
    return (rank, in_features), (out_features, rank)


# --------------------------------------------------------------------------------------------------------------------
# Computing merged tensors.


class AdapterTensors:
    """Reads adapter tensors on demand, as float32, refusing non-finite ones.

    Args:
        file: the adapter's safetensors file.
    """

    def __init__(self, file: Path) -> None:
        self.file = file

    def __call__(self, key: str) -> torch.Tensor:
        """The adapter tensor ``key`` as float32.

        Args:
            key: its key in the adapter file.

        Raises:
            OsstuneError: the tensor holds inf or NaN (the adapter is broken; merging would spread it).
        """
        with safe_open(str(self.file), framework="pt") as f:
            value = f.get_tensor(key).to(torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise OsstuneError(f"{self.file}: {key} holds inf or NaN; the adapter is broken (check the training "
                               "loss) and cannot be merged.")
        return value


def add_low_rank_(weight: torch.Tensor, update: LoraUpdate, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add a low-rank update to a 2-D float32 weight in place (linear, embedding or 2-D parameter target).

    Args:
        weight: the weight, ``[out, in]`` (``[in, out]`` with ``fan_in_fan_out``; ``[num, dim]`` for an embedding).
        update: the update.
        a: ``lora_A`` ``[r, in]`` (``lora_embedding_A`` ``[r, num]``).
        b: ``lora_B`` ``[out, r]`` (``lora_embedding_B`` ``[dim, r]``).
    """
    if update.kind == "embedding" or update.transposed:
        weight.addmm_(a.T, b.T, alpha=update.scaling)
    else:
        weight.addmm_(b, a, alpha=update.scaling)


def add_expert_delta_(
    weight: torch.Tensor, update: LoraUpdate, a: torch.Tensor, b: torch.Tensor, expert: int, num_experts: int
) -> None:
    """Add expert ``expert``'s share of a 3-D stack's update to its float32 weight, in place.

    Args:
        weight: the expert's weight, ``[in, out]`` (``[out, in]`` for a transposed stack).
        update: the update.
        a: ``lora_A`` ``[r * E, in]``, expert-major rows: ``A_e = a[e*r:(e+1)*r]``.
        b: ``lora_B`` ``[out, r * E]``, rank-major columns: ``B_e = b[:, e::E]``.
        expert: the expert's index.
        num_experts: ``E``.
    """
    rank = update.rank
    a_e = a[expert * rank:(expert + 1) * rank]  # [r, in]
    b_e = b[:, expert::num_experts]  # [out, r]
    if update.transposed:
        weight.addmm_(b_e, a_e, alpha=update.scaling)
    else:
        weight.addmm_(a_e.T, b_e.T, alpha=update.scaling)


def merged_tensor(tensor: BaseTensor, plan: AdapterPlan, adapter: AdapterTensors, dtype: torch.dtype) -> torch.Tensor:
    """A base tensor with the adapter's changes, cast to ``dtype`` (non-float tensors keep their dtype).

    The sum is formed in float32 and rounded once.

    Args:
        tensor: the base tensor (MXFP4 stacks are decoded).
        plan: the adapter plan.
        adapter: reads adapter tensors.
        dtype: output dtype of floating-point tensors.
    """
    if tensor.mxfp4 or any(u.kind == "experts" for u in plan.updates.get(tensor.name, ())):
        out = torch.empty(tensor.shape, dtype=dtype)
        for expert, weight in enumerate(merged_experts(tensor, plan, adapter)):
            out[expert] = weight
        return out
    if not plan.changes(tensor.name):
        stored = tensor.read()
        return stored.to(dtype) if stored.is_floating_point() else stored
    key = plan.replacements.get(tensor.name)
    weight = (adapter(key) if key else tensor.read()).to(torch.float32, copy=True)
    for update in plan.updates.get(tensor.name, ()):
        add_low_rank_(weight, update, adapter(update.key_a), adapter(update.key_b))
    for bias in plan.biases.get(tensor.name, ()):
        weight.add_(adapter(bias.key), alpha=bias.scaling)
    return weight.to(dtype)


def merged_experts(tensor: BaseTensor, plan: AdapterPlan, adapter: AdapterTensors) -> Iterator[torch.Tensor]:
    """The merged weights of a 3-D expert stack, one expert at a time, float32.

    Args:
        tensor: the base stack (MXFP4 or dense).
        plan: the adapter plan.
        adapter: reads adapter tensors.

    Yields:
        Expert e's merged weight, in the stack's orientation (``[in, out]`` for gpt-oss).
    """
    num_experts = tensor.shape[0]
    expert_weight = _expert_reader(tensor, plan, adapter)
    factors = [(u, adapter(u.key_a), adapter(u.key_b)) for u in plan.updates.get(tensor.name, ())]
    for expert in range(num_experts):
        weight = expert_weight(expert)
        for update, a, b in factors:
            add_expert_delta_(weight, update, a, b, expert, num_experts)
        yield weight


def _expert_reader(tensor: BaseTensor, plan: AdapterPlan, adapter: AdapterTensors) -> Callable[[int], torch.Tensor]:
    """A function giving expert e's weight before LoRA as a fresh float32 tensor: from the adapter's saved stack if
    it has one, else from the base, decoded from MXFP4 one expert at a time.

    Args:
        tensor: the base stack.
        plan: the adapter plan.
        adapter: reads adapter tensors.
    """
    key = plan.replacements.get(tensor.name)
    if key is None and tensor.mxfp4:
        blocks, scales = tensor.read_mxfp4()
        return lambda e: dequantize_mxfp4(blocks[e:e + 1], scales[e:e + 1], torch.float32)[0]
    stack = adapter(key) if key else tensor.read()
    return lambda e: stack[e].to(torch.float32, copy=True)


# --------------------------------------------------------------------------------------------------------------------
# The export.


@dataclass(frozen=True)
class MergedWeights:
    """What ``write_merged_weights`` wrote.

    Args:
        files: the safetensors shards, in order.
        index: ``model.safetensors.index.json`` (None for a single file).
        total_bytes: tensor data written.
        changed: base tensors the adapter changed (dense names).
        requantized: expert stacks re-quantised to MXFP4.
    """

    files: list[Path]
    index: Path | None
    total_bytes: int
    changed: list[str]
    requantized: list[str]


def write_merged_weights(
    base_dir: Path,
    base: dict[str, BaseTensor],
    plan: AdapterPlan,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    mxfp4_experts: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    on_tensor: Callable[[str], None] | None = None,
) -> MergedWeights:
    """Write the base model with the adapter merged as sharded safetensors, one tensor at a time.

    Args:
        base_dir: the base model folder (for messages).
        base: its tensors (``read_base_tensors``).
        plan: the adapter plan (``plan_adapter``).
        out_dir: existing folder to write the shards (and index) into.
        dtype: dtype of floating-point output tensors (MXFP4 expert stacks are decoded exactly to it).
        mxfp4_experts: store the gpt-oss expert stacks as MXFP4 ``*_blocks``/``*_scales`` under the original names;
            stacks the adapter does not change are copied bit for bit, the others are re-quantised.
        max_shard_bytes: the largest data size of one shard.
        on_tensor: called with each base tensor's name after it is written (progress).

    Returns:
        What was written.

    Raises:
        OsstuneError: MXFP4 asked for where the expert stacks cannot take it, or adapter weights that are not finite.
    """
    adapter = AdapterTensors(plan.file)
    order = sorted(base.values(), key=lambda t: _natural_key(t.name))
    quantize = {t.name for t in order if mxfp4_experts and GPT_OSS_EXPERT_STACK.search(t.name) and len(t.shape) == 3}
    if mxfp4_experts and not quantize:
        raise OsstuneError(f"--quant_method mxfp4: {base_dir} has no gpt-oss expert stacks to store as MXFP4.")
    for name in sorted(quantize):
        if base[name].shape[1] % BLOCK_SIZE:
            raise OsstuneError(f"--quant_method mxfp4: {name} has {base[name].shape[1]} inputs, not a multiple of "
                               f"{BLOCK_SIZE}.")
    outputs = [out for tensor in order for out in _outputs(tensor, dtype, tensor.name in quantize)]
    shards = shard_plan(outputs, max_shard_bytes)
    writer = ShardWriter(out_dir, shards)
    try:
        for tensor in order:
            for name, value in _merged_outputs(tensor, plan, adapter, dtype, tensor.name in quantize):
                writer.write(name, value)
                del value
            if on_tensor is not None:
                on_tensor(tensor.name)
    finally:
        writer.close()
    files = [out_dir / name for name in writer.names]
    index = None
    if len(files) > 1:
        index = out_dir / INDEX_FILE
        index.write_text(json.dumps(writer.index(), indent=2) + "\n", encoding="utf-8")
    return MergedWeights(
        files=files,
        index=index,
        total_bytes=sum(t.nbytes for t in outputs),
        changed=[t.name for t in order if plan.changes(t.name)],
        requantized=sorted(name for name in quantize if plan.changes(name) or not base[name].mxfp4),
    )


def _outputs(tensor: BaseTensor, dtype: torch.dtype, mxfp4: bool) -> list[OutputTensor]:
    """The output tensors one base tensor becomes.

    Args:
        tensor: the base tensor.
        dtype: the output float dtype.
        mxfp4: store it as MXFP4 blocks and scales.
    """
    if mxfp4:
        experts, in_features, out_features = tensor.shape
        groups = in_features // BLOCK_SIZE
        return [OutputTensor(tensor.name + MXFP4_BLOCKS, torch.uint8, (experts, out_features, groups, BLOCK_SIZE // 2)),
                OutputTensor(tensor.name + MXFP4_SCALES, torch.uint8, (experts, out_features, groups))]
    floating = tensor.mxfp4 or tensor.dtype.is_floating_point
    return [OutputTensor(tensor.name, dtype if floating else tensor.dtype, tensor.shape)]


def _merged_outputs(
    tensor: BaseTensor, plan: AdapterPlan, adapter: AdapterTensors, dtype: torch.dtype, mxfp4: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Compute the output tensors of one base tensor (see ``_outputs``), in order.

    Args:
        tensor: the base tensor.
        plan: the adapter plan.
        adapter: reads adapter tensors.
        dtype: the output float dtype.
        mxfp4: store it as MXFP4 blocks and scales.
    """
    if not mxfp4:
        if tensor.mxfp4 and not plan.changes(tensor.name):
            blocks, scales = tensor.read_mxfp4()
            yield tensor.name, dequantize_mxfp4(blocks, scales, dtype)
        else:
            yield tensor.name, merged_tensor(tensor, plan, adapter, dtype)
        return
    if tensor.mxfp4 and not plan.changes(tensor.name):
        blocks, scales = tensor.read_mxfp4()
    else:
        num_experts, in_features, out_features = tensor.shape
        groups = in_features // BLOCK_SIZE
        blocks = torch.empty(num_experts, out_features, groups, BLOCK_SIZE // 2, dtype=torch.uint8)
        scales = torch.empty(num_experts, out_features, groups, dtype=torch.uint8)
        for expert, weight in enumerate(merged_experts(tensor, plan, adapter)):
            expert_blocks, expert_scales = quantize_mxfp4(weight.unsqueeze(0))
            blocks[expert], scales[expert] = expert_blocks[0], expert_scales[0]
    yield tensor.name + MXFP4_BLOCKS, blocks
    yield tensor.name + MXFP4_SCALES, scales


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]
