"""Which decoder layers recompute their activations in the backward pass, and where checkpointed inputs live.

:func:`plan_checkpointing` turns ``--gradient_checkpointing true|false|auto`` and ``--offload_activations`` into a
:class:`CheckpointPlan`; :func:`apply_checkpointing` switches it on in a model through the mechanism transformers
itself uses (``GradientCheckpointingLayer``: a layer with ``gradient_checkpointing = True`` runs its ``forward``
through ``_gradient_checkpointing_func``), one layer at a time, with non-reentrant ``torch.utils.checkpoint``.
Both work on any model with a stack of such layers (PEFT-wrapped included), without the rest of ``osstune sft``.

``auto`` keeps as many layers un-checkpointed as the free device memory allows. Every layer costs the same to
recompute, so the layers that save the least memory by being checkpointed are left un-checkpointed first (on
gpt-oss, layers without expert LoRA before those with it); among equal layers the last ones go first, because the
backward pass frees them before it recomputes any earlier layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from osstune.errors import OsstuneError
from osstune.models.memory import (
    LoraLayout,
    TrainingShape,
    activation_overhead_bytes,
    format_bytes,
    kept_activation_bytes,
    layer_activation_sizes,
)

SHARDED_AUTO_NOTE = ("--gradient_checkpointing auto under --deepspeed/--fsdp checkpoints every layer: those engines "
                     "place the model and allocate their buffers after the plan would be made, so the free memory is "
                     "not known yet.")
"""Printed when ``auto`` falls back to every layer under a sharding engine."""

AUTO_HEADROOM = 0.1
"""Fraction of the device's total memory that ``auto`` leaves unplanned: allocator fragmentation, kernel workspaces
and the backward pass's temporary gradients."""


@dataclass(frozen=True)
class CheckpointPlan:
    """Which decoder layers are checkpointed, and whether their saved inputs go to host RAM.

    Args:
        mode: ``true`` (every layer), ``false`` (none) or ``auto`` (as many as the free memory requires).
        num_layers: decoder layers of the model.
        checkpointed: indices of the checkpointed layers, ascending.
        offload: the inputs the checkpointed layers save are held in pinned host RAM.
        free_bytes: device memory free when ``auto`` planned (None: unknown, or not ``auto``).
        reserve_bytes: of ``free_bytes``, what ``auto`` kept for everything but the decoder layers' activations.
        layer_bytes: per layer, the bytes it saves for the longest micro-batch when not checkpointed.
        input_bytes: per layer, the bytes of its input (what it keeps when checkpointed).
        micro_batch: ``(sequences, tokens per sequence)`` the sizes are for, when known.
    """

    mode: str
    num_layers: int
    checkpointed: tuple[int, ...]
    offload: bool
    free_bytes: int | None = None
    reserve_bytes: int = 0
    layer_bytes: tuple[int, ...] = ()
    input_bytes: tuple[int, ...] = ()
    micro_batch: tuple[int, int] | None = None

    @property
    def every_layer(self) -> bool:
        """Whether every decoder layer is checkpointed."""
        return len(self.checkpointed) == self.num_layers

    @property
    def host_bytes(self) -> int:
        """Bytes of checkpointed inputs held in host RAM per micro-step (0 without offload or sizes)."""
        if not self.offload or not self.input_bytes:
            return 0
        return sum(self.input_bytes[index] for index in self.checkpointed)

    @property
    def device_bytes(self) -> int | None:
        """Peak device bytes the decoder layers keep for the backward pass under this plan (None without sizes)."""
        if not self.layer_bytes:
            return None
        return kept_activation_bytes(self.layer_bytes, self.input_bytes, set(self.checkpointed), offload=self.offload)

    def describe(self) -> str:
        """One line for the console, e.g. ``checkpointing 14 of 24 layers (auto: 31.2 GiB free, 9.5 GiB reserved,
        1.9 GiB per un-checkpointed layer at 4 x 2048)``."""
        line = f"checkpointing {len(self.checkpointed)} of {self.num_layers} layers ({self.mode}"
        free = self.free_bytes
        if self.mode == "auto" and free is None:
            line += ": free device memory unknown, so every layer"
        elif self.mode == "auto" and free is not None:
            line += f": {format_bytes(free)} free, {format_bytes(self.reserve_bytes)} reserved"
            if self.layer_bytes:
                low, high = min(self.layer_bytes), max(self.layer_bytes)
                size = format_bytes(high) if low == high else f"{format_bytes(low)} to {format_bytes(high)}"
                at = f" at {self.micro_batch[0]} x {self.micro_batch[1]}" if self.micro_batch else ""
                line += f", {size} per un-checkpointed layer{at}"
        line += ")"
        if self.offload and self.checkpointed:
            held = f" ({format_bytes(self.host_bytes)})" if self.input_bytes else ""
            line += f"; their inputs{held} held in host RAM"
        needed = self.device_bytes
        if self.mode == "auto" and free is not None and needed is not None and needed > free - self.reserve_bytes:
            line += (f"; even so the layers' activations need {format_bytes(needed)} of the "
                     f"{format_bytes(max(free - self.reserve_bytes, 0))} left: lower --max_length or the batch size"
                     + ("" if self.offload else ", or pass --offload_activations true"))
        return line


def plan_checkpointing(
    mode: str,
    *,
    num_layers: int,
    free_bytes: int | None,
    layer_bytes_full: Sequence[int],
    layer_bytes_checkpointed: Sequence[int],
    reserve_bytes: int,
    offload: bool,
    micro_batch: tuple[int, int] | None = None,
) -> CheckpointPlan:
    """Decide which decoder layers are checkpointed (a pure function of sizes).

    ``true`` checkpoints every layer, ``false`` none. ``auto`` leaves as many layers un-checkpointed as fit in
    ``free_bytes - reserve_bytes``, counting the device bytes of :func:`~osstune.models.memory.kept_activation_bytes`
    (un-checkpointed layers' saved tensors, checkpointed layers' inputs unless offloaded, one layer recomputed);
    layers are left un-checkpointed in order of the memory that costs, cheapest first, the last layers first among
    equals (see the module docstring). With ``free_bytes`` None (the CPU, or an engine that allocates after the
    plan), ``auto`` checkpoints every layer.

    Args:
        mode: ``true``, ``false`` or ``auto``.
        num_layers: decoder layers of the model.
        free_bytes: device memory free for training, None when unknown.
        layer_bytes_full: per layer, the bytes it saves for the longest micro-batch when not checkpointed.
        layer_bytes_checkpointed: per layer, the bytes it keeps when checkpointed (its input).
        reserve_bytes: of ``free_bytes``, what the rest of training still needs (gradients, optimizer state, logits,
            headroom).
        offload: hold the checkpointed layers' inputs in host RAM.
        micro_batch: ``(sequences, tokens per sequence)`` the sizes are for, for :meth:`CheckpointPlan.describe`.

    Raises:
        OsstuneError: an unknown mode, or ``offload`` with ``false`` (nothing is checkpointed to offload).
        ValueError: per-layer sizes that do not number ``num_layers``.
    """
    check_offload(mode, offload)
    if len(layer_bytes_full) != num_layers or len(layer_bytes_checkpointed) != num_layers:
        raise ValueError(f"per-layer sizes for {len(layer_bytes_full)} and {len(layer_bytes_checkpointed)} layers, "
                         f"expected {num_layers}")
    every = tuple(range(num_layers))
    plan = functools.partial(CheckpointPlan, mode=mode, num_layers=num_layers, offload=offload,
                             layer_bytes=tuple(layer_bytes_full), input_bytes=tuple(layer_bytes_checkpointed),
                             micro_batch=micro_batch)
    if mode == "false":
        return plan(checkpointed=())
    if mode == "true" or free_bytes is None:
        return plan(checkpointed=every)
    stored = [0 if offload else size for size in layer_bytes_checkpointed]
    order = sorted(every, key=lambda i: (layer_bytes_full[i] - stored[i], -i))
    budget = free_bytes - reserve_bytes
    for keep in range(num_layers, -1, -1):
        checkpointed = set(order[keep:])
        if kept_activation_bytes(layer_bytes_full, layer_bytes_checkpointed, checkpointed, offload=offload) <= budget:
            break
    return plan(checkpointed=tuple(sorted(checkpointed)), free_bytes=free_bytes, reserve_bytes=reserve_bytes)


def check_offload(mode: str, offload: bool) -> None:
    """Reject an unknown mode, and offload without checkpointing.

    Args:
        mode: ``--gradient_checkpointing``: ``true``, ``false`` or ``auto``.
        offload: ``--offload_activations``.

    Raises:
        OsstuneError: an unknown mode, or ``offload`` with ``false`` (nothing is checkpointed to offload).
    """
    if mode not in ("true", "false", "auto"):
        raise OsstuneError(f"--gradient_checkpointing {mode}: expected true, false or auto.")
    if offload and mode == "false":
        raise OsstuneError("--offload_activations true holds the inputs of checkpointed layers in host RAM; with "
                           "--gradient_checkpointing false no layer is checkpointed. Pass --gradient_checkpointing "
                           "true or auto, or leave --offload_activations out.")


def plan_for_shape(
    mode: str,
    *,
    config: dict[str, Any],
    lora: LoraLayout,
    shape: TrainingShape,
    dtype_bytes: int,
    memory: tuple[int, int] | None,
    reserve_bytes: int,
    offload: bool,
) -> CheckpointPlan:
    """:func:`plan_checkpointing` with the per-layer sizes of :mod:`osstune.models.memory` for a micro-batch.

    The reserve grows by the activations outside the decoder layers and :data:`AUTO_HEADROOM` of the device.

    Args:
        mode: ``true``, ``false`` or ``auto``.
        config: the model's ``config.json``.
        lora: where LoRA sits.
        shape: the longest micro-batch.
        dtype_bytes: bytes per element of the compute dtype.
        memory: ``(free, total)`` bytes of the training device (see :func:`device_memory`), None when unknown.
        reserve_bytes: what training still allocates besides activations (gradients, optimizer state, logits, and
            weights not yet loaded).
        offload: hold the checkpointed layers' inputs in host RAM.
    """
    full, inputs = layer_activation_sizes(config, lora=lora, shape=shape, dtype_bytes=dtype_bytes)
    free = None if memory is None else memory[0]
    headroom = 0 if memory is None else int(AUTO_HEADROOM * memory[1])
    reserve = reserve_bytes + activation_overhead_bytes(config, shape=shape, dtype_bytes=dtype_bytes) + headroom
    return plan_checkpointing(mode, num_layers=len(full), free_bytes=free, layer_bytes_full=full,
                              layer_bytes_checkpointed=inputs, reserve_bytes=reserve, offload=offload,
                              micro_batch=(shape.micro_batch, shape.seq_len))


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA device, counting memory PyTorch's allocator holds unused as free; None for
    other devices (the CPU's activations live in host RAM, which ``auto`` does not plan).

    Args:
        device: the training device.
    """
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached), int(total)


class HostOffload:
    """Saved-tensor hooks that hold tensors in host RAM: accelerator tensors are copied to pinned host memory when
    saved and back (non-blocking) when the backward pass unpacks them; host tensors are kept as they are.

    ``tensors`` and ``bytes`` count what has been packed so far.
    """

    def __init__(self) -> None:
        self.tensors = 0
        self.bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context in which autograd saves tensors through these hooks."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        """Move one saved tensor to host RAM.

        Args:
            tensor: the tensor autograd saves.

        Returns:
            Its device and its host copy (the tensor itself when it is on the CPU already).
        """
        self.tensors += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu":
            return tensor.device, tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    @staticmethod
    def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        """Bring a packed tensor back to its device.

        Args:
            packed: what :meth:`pack` returned.
        """
        device, host = packed
        return host.to(device, non_blocking=True)


def decoder_layers(model: nn.Module, num_layers: int | None = None) -> list[nn.Module]:
    """The decoder layers of a model (PEFT-wrapped or not): the one ``ModuleList`` of transformers'
    ``GradientCheckpointingLayer`` modules (e.g. ``GptOssDecoderLayer``).

    Args:
        model: the model.
        num_layers: when the model holds several such stacks (a vision tower), the length of the wanted one.

    Raises:
        OsstuneError: no stack, or no single stack of ``num_layers`` layers.
    """
    stacks = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0
              and all(isinstance(layer, GradientCheckpointingLayer) for layer in module)]
    if len(stacks) > 1 and num_layers is not None:
        stacks = [stack for stack in stacks if len(stack) == num_layers]
    if len(stacks) != 1:
        found = ", ".join(str(len(stack)) for stack in stacks) or "none"
        raise OsstuneError(f"{type(model).__name__}: cannot tell its decoder layers for activation checkpointing "
                           f"(stacks of checkpointable layers found: {found}). Pass --gradient_checkpointing false "
                           "to train without it.")
    return list(stacks[0])


def apply_checkpointing(model: nn.Module, plan: CheckpointPlan) -> HostOffload | None:
    """Checkpoint exactly the planned decoder layers of ``model`` (and switch every other layer off).

    Each planned layer runs its forward through non-reentrant ``torch.utils.checkpoint``; with ``plan.offload``
    the inputs that checkpoint saves go through :class:`HostOffload` (only those: the recomputed layer's own
    tensors and the un-checkpointed layers are untouched). As ``PreTrainedModel.activation_checkpointing_enable``
    does, the model-level ``gradient_checkpointing`` flags are set too (they turn the KV cache off in training).
    Applying a ``false`` plan undoes an earlier plan or transformers' own checkpointing.

    Args:
        model: the model, e.g. the ``PeftModel`` of :func:`osstune.models.lora.apply_lora`.
        plan: see :func:`plan_checkpointing`.

    Returns:
        The offload hooks (their counters say what was offloaded), or None without offload.

    Raises:
        OsstuneError: the model's decoder layers cannot be found, or do not number ``plan.num_layers``.
    """
    layers = decoder_layers(model, plan.num_layers)
    if len(layers) != plan.num_layers:
        raise OsstuneError(f"the checkpointing plan is for {plan.num_layers} layers; the model has {len(layers)}.")
    offload = HostOffload() if plan.offload and plan.checkpointed else None
    function = functools.partial(_checkpoint, offload=offload)
    chosen = set(plan.checkpointed)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = function
        layer.gradient_checkpointing = index in chosen
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and not isinstance(module, GradientCheckpointingLayer):
            module._gradient_checkpointing_func = function
            module.gradient_checkpointing = bool(chosen)
    return offload


def _checkpoint(function: Callable[..., Any], *args: Any, offload: HostOffload | None) -> Any:
    """Run ``function(*args)`` under non-reentrant checkpointing, saving ``args`` through ``offload`` when given."""
    if offload is None:
        return checkpoint(function, *args, use_reentrant=False)
    with offload.hooks():
        return checkpoint(function, *args, use_reentrant=False)
