"""gpt-oss experts that stay in their checkpoint's MXFP4 blocks/scales while LoRA trains on them.

``Mxfp4Experts`` is a ``GptOssExperts`` whose dense ``gate_up_proj`` / ``down_proj`` are replaced by the uint8
buffers ``*_blocks`` / ``*_scales`` of the checkpoint (see ``osstune.models.gpt_oss.mxfp4``). Each projection
dequantises its weights right before the matmul, inside an autograd function that keeps no dense weight for the
backward pass: the backward dequantises again (``Mxfp4Matmul``). On the per-expert loop (CPU, float32) only one
expert's weights are dense at a time; on the grouped kernel the layer's stack is, or, with ``max_dense_experts``,
one slice of it (of output rows, or of input columns for the input gradient) at a time.

PEFT interplay: PEFT's ``target_parameters`` only wraps registered parameters, and sizes ``lora_A`` / ``lora_B``
from their shapes. ``gate_up_proj`` and ``down_proj`` therefore remain registered as frozen placeholders of the
dense shape and dtype that own a single zero element (a broadcast view), so PEFT creates its adapter in its own
names and shapes and ``save_pretrained`` / ``PeftModel.from_pretrained`` work unchanged; the saved adapter loads
onto a dense base. The placeholders are never read as weights: the grouped LoRA forward
(``osstune.models.gpt_oss.moe_lora``) uses ``weight_stacks()``, and PEFT's own forward (which would add the update
to the placeholder) is refused. Merging into a placeholder fails; merge on a dense base instead.

``load_mxfp4_model`` builds a gpt-oss model on the meta device and fills it tensor by tensor from the safetensors
shards, so no dense copy of the experts is ever made, on the device or in host RAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from osstune.errors import OsstuneError
from osstune.models.gpt_oss.experts import ClampSwiGLUGate, LoraFactors, experts_forward
from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE, dequantize_mxfp4

EXPERT_STACKS: tuple[str, ...] = ("gate_up_proj", "down_proj")
"""The expert weight stacks that MXFP4 checkpoints store as ``{name}_blocks`` and ``{name}_scales``."""

ROW_ALIGN = 32
"""Output-row slices of a bounded dequantisation start at multiples of this, so that each slice's products (a
column block of the result) stay 16-byte aligned for the grouped kernel."""


@dataclass(frozen=True)
class Mxfp4Stack:
    """One projection's expert weights ``[E, I, O]`` as MXFP4 codes, multiplied without being kept dense.

    Implements ``osstune.models.gpt_oss.experts.ExpertWeights``.

    Args:
        blocks: uint8 ``[E, O, I / 32, 16]``, two E2M1 codes per byte (low nibble = even input column).
        scales: uint8 ``[E, O, I / 32]``, E8M0 block scales.
        compute_dtype: dtype the weights are dequantised to and multiplied in.
        max_dense_experts: on the grouped kernel, bound the dense scratch to this many experts' worth of weights:
            the stack is dequantised in ``ceil(E / max_dense_experts)`` slices, each holding every expert's share
            of the output rows (forward) or input columns (input gradient), and each slice's products land in their
            columns of the result; no host sync either way. None: the whole stack at once.
    """

    blocks: torch.Tensor
    scales: torch.Tensor
    compute_dtype: torch.dtype
    max_dense_experts: int | None = None

    @property
    def shape(self) -> torch.Size:
        """The dense shape ``[E, I, O]``."""
        num_experts, rows, groups, _ = self.blocks.shape
        return torch.Size((num_experts, groups * BLOCK_SIZE, rows))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return self.compute_dtype

    def dequantize(self, experts: slice = slice(None)) -> torch.Tensor:
        """Dense weights of some experts, ``[e, I, O]``, bit-identical to transformers' MXFP4 dequantisation.

        On CUDA (float32/bfloat16/float16) one Triton kernel decodes them (``osstune.kernels.mxfp4``); elsewhere the
        PyTorch reference ``dequantize_mxfp4`` does, which is the specification the kernel is tested against.

        Args:
            experts: which experts, as a slice of the expert dimension.
        """
        blocks, scales = self.blocks[experts], self.scales[experts]
        if blocks.is_cuda and self.compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
            from osstune.kernels.mxfp4 import dequantize_mxfp4_triton  # imports Triton, which CPU installs may lack

            return dequantize_mxfp4_triton(blocks, scales, self.compute_dtype)
        return dequantize_mxfp4(blocks, scales, self.compute_dtype)

    def dequantize_rows(self, experts: slice = slice(None), rows: slice = slice(None),
                        groups: slice = slice(None)) -> torch.Tensor:
        """Dense weights in the checkpoint's order, ``[e, O, I]`` (``dequantize`` transposed), or a slice of them.

        Args:
            experts: which experts, as a slice of the expert dimension.
            rows: which output rows (O).
            groups: which input columns, in scale groups of ``BLOCK_SIZE`` columns (I / 32).
        """
        blocks, scales = self.blocks[experts, rows, groups], self.scales[experts, rows, groups]
        if blocks.is_cuda and self.compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
            from osstune.kernels.mxfp4 import dequantize_mxfp4_triton

            return dequantize_mxfp4_triton(blocks, scales, self.compute_dtype, transposed=False)
        return dequantize_mxfp4(blocks, scales, self.compute_dtype).transpose(1, 2)

    def matmul(self, x_SI: torch.Tensor, ends_E: torch.Tensor, grouped: bool) -> torch.Tensor:
        """``out[s] = x_SI[s] @ W[e]`` for the expert e owning row s; differentiable in ``x_SI`` only.

        Args:
            x_SI: rows sorted by expert, [S, I], in the compute dtype.
            ends_E: int32 end row of each expert's block, [E].
            grouped: use the grouped matmul kernel (the whole stack is dequantised) or loop over the experts
                (one expert's weights dense at a time).

        Returns:
            The products, [S, O].
        """
        return Mxfp4Matmul.apply(x_SI, self, ends_E, grouped)

    def multiply(self, x_SN: torch.Tensor, ends_E: torch.Tensor, grouped: bool, transpose: bool) -> torch.Tensor:
        """Each expert's block of rows times its dequantised weight (or that weight's transpose), without autograd.

        Args:
            x_SN: rows sorted by expert, [S, I] (or [S, O] with ``transpose``).
            ends_E: int32 end row of each expert's block, [E].
            grouped: dequantise the whole stack and use the grouped kernel; otherwise loop, dequantising only
                experts that own rows.
            transpose: multiply by ``W[e].T`` (the input gradient of ``x @ W[e]``).

        Returns:
            ``x_SN[s] @ W[e]`` (or ``@ W[e].T``), [S, O] (or [S, I]).
        """
        if grouped:
            return self._grouped(x_SN, ends_E, transpose)
        width = self.shape[1] if transpose else self.shape[2]
        ends = ends_E.tolist()
        pieces = []
        for expert, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            if end == start:
                pieces.append(x_SN.new_zeros(0, width))
                continue
            w_IO = self.dequantize(slice(expert, expert + 1))[0]
            pieces.append(x_SN[start:end] @ (w_IO.T if transpose else w_IO))
        return torch.cat(pieces)


    def _grouped(self, x_SN: torch.Tensor, ends_E: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``multiply`` on the grouped kernel: the weights are dequantised in the checkpoint's ``[E, O, I]`` order,
        which is ``W.T`` contiguous and ``W`` as a transposed view, so neither direction copies them. With
        ``max_dense_experts`` they are dequantised in slices (``slices``): of output rows for ``x @ W[e]``, of
        input columns for ``x @ W[e].T``; each slice's products are the result's columns of that slice, exactly
        (every product still sums over the whole inner dimension).

        Args:
            x_SN: rows sorted by expert.
            ends_E: int32 end row of each expert's block, [E].
            transpose: multiply by ``W[e].T``.
        """
        kernel = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        num_experts, rows, groups, _ = self.blocks.shape
        parts = self.slices(groups if transpose else rows, align=1 if transpose else ROW_ALIGN)
        if len(parts) == 1:
            w_EOI = self.dequantize_rows()
            return kernel(x_SN, w_EOI if transpose else w_EOI.transpose(1, 2), offs=ends_E)
        out = x_SN.new_empty(x_SN.shape[0], groups * BLOCK_SIZE if transpose else rows)
        for part in parts:
            if transpose:
                w_EOi = self.dequantize_rows(groups=part)
                out[:, part.start * BLOCK_SIZE: part.stop * BLOCK_SIZE] = kernel(x_SN, w_EOi, offs=ends_E)
                del w_EOi
            else:
                w_EoI = self.dequantize_rows(rows=part)
                out[:, part] = kernel(x_SN, w_EoI.transpose(1, 2), offs=ends_E)
                del w_EoI
        return out

    def slices(self, units: int, align: int) -> list[slice]:
        """Consecutive slices of a weight dimension, each dequantised on its own under ``max_dense_experts``.

        Args:
            units: the dimension's length (output rows, or input scale groups).
            align: slice boundaries fall on multiples of this (keeps each slice's products aligned for the grouped
                kernel).

        Returns:
            ``[slice(None)]`` without a bound (or when it covers every expert); otherwise
            ``ceil(E / max_dense_experts)`` slices of at most ``ceil(units / count)`` units (rounded up to
            ``align``), so each holds at most about ``max_dense_experts`` experts' worth of weights.
        """
        num_experts = self.blocks.shape[0]
        if not self.max_dense_experts or self.max_dense_experts >= num_experts or units <= align:
            return [slice(None)]
        count = -(-num_experts // self.max_dense_experts)  # ceil
        per_slice = -(-units // count)
        step = -(-per_slice // align) * align
        return [slice(start, min(start + step, units)) for start in range(0, units, step)]


class Mxfp4Matmul(torch.autograd.Function):
    """``x @ W[e]`` per expert block with ``W`` dequantised from MXFP4 in the forward and again in the backward.

    Only the routing offsets are saved for the backward; no dense weight outlives the call that made it.
    """

    @staticmethod
    def forward(ctx: Any, x_SI: torch.Tensor, stack: Mxfp4Stack, ends_E: torch.Tensor, grouped: bool) -> torch.Tensor:
        """Compute the products.

        Args:
            ctx: autograd context.
            x_SI: rows sorted by expert, [S, I].
            stack: the MXFP4 weights.
            ends_E: int32 end row of each expert's block, [E].
            grouped: use the grouped matmul kernel.
        """
        ctx.save_for_backward(ends_E)
        ctx.stack = stack
        ctx.grouped = grouped
        return stack.multiply(x_SI, ends_E, grouped, transpose=False)

    @staticmethod
    def backward(ctx: Any, grad_SO: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        """Input gradient ``grad @ W[e].T``, with ``W`` dequantised again; the codes get no gradient.

        Args:
            ctx: autograd context.
            grad_SO: gradient of the products, [S, O].
        """
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (ends_E,) = ctx.saved_tensors
        return ctx.stack.multiply(grad_SO.contiguous(), ends_E, ctx.grouped, transpose=True), None, None, None


class Mxfp4Experts(GptOssExperts):
    """``GptOssExperts`` holding its weight stacks as MXFP4 codes; the grouped expert forward dequantises on the fly.

    Buffers ``gate_up_proj_blocks`` / ``_scales`` and ``down_proj_blocks`` / ``_scales`` (uint8, the checkpoint's
    layout) replace the dense stacks; the biases stay parameters. ``gate_up_proj`` and ``down_proj`` remain as
    frozen placeholders of the dense shape that own one element (see the module docstring).

    Args:
        config: the gpt-oss config (sizes and SwiGLU constants).
        blocks: ``{stack}_blocks`` for both stacks of ``EXPERT_STACKS``, uint8 ``[E, O, I / 32, 16]``.
        scales: ``{stack}_scales`` for both stacks, uint8 ``[E, O, I / 32]``.
        biases: ``{stack}_bias`` for both stacks, ``[E, O]``, already in ``dtype`` and on the blocks' device.
        dtype: compute dtype of the experts.

    Raises:
        OsstuneError: a missing stack, or codes or biases whose shapes do not fit the config.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        blocks: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        with torch.device("meta"):
            super().__init__(config)
        self.compute_dtype = dtype
        self.max_dense_experts: int | None = None
        dims = {"gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size)}
        for name in EXPERT_STACKS:
            if name not in blocks or name not in scales or name not in biases:
                raise OsstuneError(f"MXFP4 experts need {name} blocks, scales and bias")
            in_width, out_width = dims[name]
            groups = in_width // BLOCK_SIZE
            expected = {
                "blocks": ((self.num_experts, out_width, groups, BLOCK_SIZE // 2), blocks[name]),
                "scales": ((self.num_experts, out_width, groups), scales[name]),
                "bias": ((self.num_experts, out_width), biases[name]),
            }
            for kind, (shape, tensor) in expected.items():
                if tuple(tensor.shape) != shape:
                    raise OsstuneError(f"{name}_{kind} has shape {tuple(tensor.shape)}; the config needs {shape}")
            device = blocks[name].device
            delattr(self, name)
            placeholder = torch.zeros((), dtype=dtype, device=device).expand(self.num_experts, in_width, out_width)
            self.register_parameter(name, nn.Parameter(placeholder, requires_grad=False))
            self.register_buffer(f"{name}_blocks", blocks[name])
            self.register_buffer(f"{name}_scales", scales[name])
            setattr(self, f"{name}_bias", nn.Parameter(biases[name]))

    def weight_stacks(self) -> tuple[Mxfp4Stack, Mxfp4Stack]:
        """The ``(gate_up, down)`` stacks, for ``experts_forward``; ``max_dense_experts`` (an attribute, None by
        default) bounds their dequantisation scratch (see ``Mxfp4Stack``)."""
        chunk = self.max_dense_experts
        return (
            Mxfp4Stack(self.gate_up_proj_blocks, self.gate_up_proj_scales, self.compute_dtype, chunk),
            Mxfp4Stack(self.down_proj_blocks, self.down_proj_scales, self.compute_dtype, chunk),
        )

    def forward(
        self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts without LoRA (LoRA runs through ``moe_lora.GroupedExpertLoraForward``).

        Args:
            hidden_states: token states, [T, H].
            router_indices: experts chosen per token, [T, K].
            routing_weights: weight of each chosen expert, [T, K].

        Returns:
            The mixture's output, [T, H].

        Raises:
            OsstuneError: PEFT's own forward is active on these experts (a parametrised placeholder), whose update
                would be silently lost.
        """
        if parametrize.is_parametrized(self):
            raise OsstuneError(
                "LoRA on MXFP4 experts runs on osstune's grouped forward only (enable_grouped_expert_lora), with "
                "gate_up_proj / down_proj as the only expert targets, and cannot be merged; load with "
                "expert_weights bf16 for PEFT's own forward or for merging"
            )
        return module_experts_forward(self, hidden_states, router_indices, routing_weights)


def module_experts_forward(
    experts: GptOssExperts,
    hidden_states: torch.Tensor,
    router_indices: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up_loras: Sequence[LoraFactors] = (),
    down_loras: Sequence[LoraFactors] = (),
) -> torch.Tensor:
    """``experts_forward`` on a gpt-oss experts module's own weights (its MXFP4 stacks for ``Mxfp4Experts``, else
    the dense ones), biases and clamp-SwiGLU constants, with optional LoRA updates: the fused grouped pass that
    osstune runs for every gpt-oss expert layer.

    Args:
        experts: a ``GptOssExperts`` or ``Mxfp4Experts``.
        hidden_states: token states, [T, H].
        router_indices: experts chosen per token, [T, K].
        routing_weights: weight of each chosen expert, [T, K].
        gate_up_loras: LoRA updates of the gate/up stack.
        down_loras: LoRA updates of the down stack.

    Returns:
        The mixture's output, [T, H].
    """
    if isinstance(experts, Mxfp4Experts):
        gate_up, down = experts.weight_stacks()
    else:
        gate_up, down = experts.gate_up_proj, experts.down_proj
    return experts_forward(
        hidden_states,
        router_indices,
        routing_weights,
        gate_up_EHF=gate_up,
        gate_up_bias_EF=experts.gate_up_proj_bias,
        down_EIH=down,
        down_bias_EH=experts.down_proj_bias,
        apply_gate=ClampSwiGLUGate(alpha=experts.alpha, limit=experts.limit),
        gate_up_loras=gate_up_loras,
        down_loras=down_loras,
    )


def dense_expert_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point expert weight stacks of a model that hold real dense storage.

    Args:
        model: any module; ``Mxfp4Experts`` placeholders (one element of storage) do not count.

    Returns:
        Names such as ``model.layers.0.mlp.experts.gate_up_proj``, in module order.
    """
    return [
        name
        for name, param in model.named_parameters()
        if name.rsplit(".", 1)[-1] in EXPERT_STACKS
        and param.is_floating_point()
        and param.untyped_storage().nbytes() >= param.numel() * param.element_size()
    ]


def load_mxfp4_model(
    model_dir: Path, weight_files: list[Path], *, dtype: torch.dtype, attn_impl: str, device: torch.device
) -> Any:
    """Load a gpt-oss MXFP4 checkpoint with its experts kept as MXFP4 (``Mxfp4Experts``), tensor by tensor.

    The model is built on the meta device; every checkpoint tensor is then read from the safetensors shards one
    at a time onto ``device`` (floating-point tensors cast to ``dtype``), the experts' blocks and scales as they
    are. The rotary embedding (not a checkpoint tensor) is rebuilt from the config.

    Args:
        model_dir: the model folder (``config.json``, optional ``generation_config.json``).
        weight_files: its safetensors files (see ``loading.check_weight_files``).
        dtype: dtype of every floating-point weight.
        attn_impl: attention implementation.
        device: where the weights go.

    Returns:
        The ``GptOssForCausalLM`` in eval mode, with ``config.quantization_config`` removed.

    Raises:
        OsstuneError: weights that are not safetensors, a checkpoint without MXFP4 experts, or tensors the model
            needs that the checkpoint lacks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if any(path.suffix != ".safetensors" for path in weight_files):
        raise OsstuneError(f"--expert_weights mxfp4 reads safetensors checkpoints only; {model_dir} has "
                           f"{', '.join(path.name for path in weight_files)}")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_impl)
    with ExitStack() as stack:
        shards = [stack.enter_context(safe_open(str(path), framework="pt", device=str(device)))
                  for path in weight_files]
        owner = {key: shard for shard in shards for key in shard.keys()}

        def read(key: str, cast: bool) -> torch.Tensor:
            if key not in owner:
                raise OsstuneError(f"--model {model_dir}: the checkpoint has no tensor {key}")
            tensor = owner[key].get_tensor(key)
            return tensor.to(dtype) if cast and tensor.is_floating_point() else tensor

        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}.mlp.experts"
            if f"{prefix}.gate_up_proj_blocks" not in owner:
                raise OsstuneError(f"--expert_weights mxfp4: {model_dir} does not store its experts as MXFP4 "
                                   f"({prefix}.gate_up_proj_blocks is missing); use --expert_weights bf16")
            layer.mlp.experts = Mxfp4Experts(
                model.config,
                blocks={name: read(f"{prefix}.{name}_blocks", cast=False) for name in EXPERT_STACKS},
                scales={name: read(f"{prefix}.{name}_scales", cast=False) for name in EXPERT_STACKS},
                biases={name: read(f"{prefix}.{name}_bias", cast=True) for name in EXPERT_STACKS},
                dtype=dtype,
            )
        for name, param in list(model.named_parameters()):
            if param.is_meta:
                _set_tensor(model, name, nn.Parameter(read(name, cast=True), requires_grad=param.requires_grad))
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta and name in owner:
                _set_tensor(model, name, read(name, cast=True))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise OsstuneError(f"--model {model_dir}: no value for {', '.join(left[:5])}")
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    return model.eval()


def is_mxfp4_checkpoint(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` declares MXFP4 weights (``quantization_config.quant_method == "mxfp4"``).

    Args:
        config: the parsed ``config.json``.
    """
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` (dotted path) of ``model`` by ``value``.

    Args:
        model: the root module.
        name: e.g. ``model.layers.0.self_attn.q_proj.weight``.
        value: an ``nn.Parameter`` for a parameter, a tensor for a buffer.
    """
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if isinstance(value, nn.Parameter):
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value
