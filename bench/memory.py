"""Memory benchmark: LoRA training of gpt-oss with the experts kept as MXFP4 on the GPU (issue "Memory").

Builds gpt-oss-20b or gpt-oss-120b with random weights directly on the GPU in the shipped layout: the experts as
MXFP4 blocks/scales (``Mxfp4Experts``, random codes at a scale that gives them a standard deviation of about 0.02),
everything else in bf16. No bf16 copy of the experts is ever made, so the 120b (60 GB of MXFP4 experts, 230 GB in
bf16) is built in memory on one card. LoRA r=8 / alpha 16 on attention and every expert (``apply_lora``), liger's
fused linear cross-entropy, activation checkpointing, AdamW over the LoRA parameters, exactly as
``train_step.py``'s osstune stack.

Cells (``--cells``):

- ``20b``: gpt-oss-20b, 1 x ``--length`` tokens, experts MXFP4-resident (whole layer dequantised at once, every
  layer checkpointed), then the lean setting (``--dequant_experts 4 --offload_activations true
  --offload_embeddings true``: 4 experts dequantised at a time, checkpointed inputs and the input embedding table
  in host RAM);
  then the same weights dequantised to dense bf16 experts (``--expert_weights bf16``), same batch: peak memory and
  tokens/s of each, and the ratios to bf16.
- ``120b``: gpt-oss-120b, 1 x ``--length`` tokens, experts MXFP4-resident, both settings.
- ``maxctx``: gpt-oss-20b, experts MXFP4-resident, lean setting, one sequence of each of ``--context-lengths`` (ascending) under
  an allocator capped at ``--memory-cap-gib`` (``torch.cuda.set_per_process_memory_fraction``), one step each,
  until one runs out of memory: the longest that trains.

Every cell reports peak allocated GiB (weights included) and a breakdown: expert weights, other weights, LoRA
parameters + gradients + AdamW state, and the rest (activations, workspace, scratch); lean cells also report the
pinned host RAM they use (the embedding table plus one step's offloaded checkpoint inputs). With OUT set
everything goes to ``$OUT/memory.json``. ``--tiny`` runs the same on the CPU with a small config.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from functools import partial
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import (  # noqa: E402 - the benchmark's own helpers, next to this file
    Options,
    Setup,
    fixed_scenario,
    linear_cross_entropy,
    LEARNING_RATE,
    make_setup,
    measure,
    save,
    token_shares,
    train_step,
)

from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE  # noqa: E402
from osstune.models.gpt_oss.mxfp4_experts import EXPERT_STACKS, Mxfp4Experts  # noqa: E402
from osstune.models.host_embedding import HostEmbedding, offload_input_embeddings  # noqa: E402
from osstune.models.loading import limit_dense_experts, resolve_attn_impl  # noqa: E402
from osstune.models.lora import LoraSpec, apply_lora  # noqa: E402
from osstune.train.checkpointing import apply_checkpointing, plan_checkpointing  # noqa: E402
from osstune.train.host_optimizer import BUCKET_BYTES, HostAdamW  # noqa: E402



@dataclass(frozen=True)
class Lean:
    """A memory-lean setting: which of osstune's memory options a cell uses.

    Written on the command line as ``+``-joined parts, e.g. ``d4+acts+emb+opt``: ``dN`` bounds the dequantisation
    scratch to N experts' worth (``--dequant_experts N``; without it the whole layer at once), ``acts`` keeps the checkpointed layer
    inputs in host RAM (``--offload_activations true``), ``emb`` the input embedding table
    (``--offload_embeddings true``), ``opt`` AdamW's moments (``--offload_optimizer true``).

    Args:
        dense_experts: the dequantisation scratch's bound in experts' worth (0: the whole layer).
        activations: checkpointed layer inputs in host RAM.
        embeddings: input embedding table in host RAM.
        optimizer: AdamW moments in host RAM (``HostAdamW``).
    """

    dense_experts: int = 0
    activations: bool = False
    embeddings: bool = False
    optimizer: bool = False

    @classmethod
    def parse(cls, text: str) -> Lean:
        """Read ``d4+acts+emb+opt`` (any subset, any order; empty: nothing offloaded, whole layers).

        Args:
            text: the setting as written on the command line.
        """
        flags = {"acts": "activations", "emb": "embeddings", "opt": "optimizer"}
        values: dict[str, Any] = {}
        for part in filter(None, text.strip().split("+")):
            if part in flags:
                values[flags[part]] = True
            elif part.startswith("d") and part[1:].isdigit():
                values["dense_experts"] = int(part[1:])
            else:
                raise SystemExit(f"--lean: unknown part {part!r} in {text!r}; use dN, acts, emb, opt")
        return cls(**values)

    @property
    def label(self) -> str:
        """The setting as written on the command line (``whole`` when nothing is set)."""
        parts = [f"d{self.dense_experts}"] if self.dense_experts else []
        parts += [name for name, on in (("acts", self.activations), ("emb", self.embeddings),
                                        ("opt", self.optimizer)) if on]
        return "+".join(parts) or "whole"


DEFAULT_LEAN = "d4+acts+emb+opt"
"""The lean setting of the 20b, 120b and maxctx cells unless ``--lean`` says otherwise."""

RANDOM_SCALE_BYTE = 120
"""E8M0 scale of the random expert codes: uniform E2M1 codes have a standard deviation of 2.93, times 2**-7."""


@dataclass
class MemoryCell:
    """One measured configuration.

    Args:
        name: what ran, e.g. ``20b mxfp4 1x4096``.
        status: ``ok``, ``OOM`` or ``error: ...``.
        tokens: tokens per step.
        step_s: the median step, seconds.
        tokens_per_s: tokens per second at the median step.
        peak_gib: peak allocated GiB over the cell, weights included.
        breakdown_gib: expert weights, other weights, LoRA state (parameters, gradients, AdamW moments) and the
            rest of the peak.
        loss: first and last step's loss.
        host_gib: pinned host RAM of the lean setting: the input embedding table plus the checkpoint inputs one
            step offloads (None for other cells, or when the steps did not all run).
    """

    name: str
    status: str
    tokens: int
    step_s: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    breakdown_gib: dict[str, float] = field(default_factory=dict)
    loss: tuple[float | None, float | None] = (None, None)
    host_gib: float | None = None


def gpt_oss_120b(config: GptOssConfig) -> GptOssConfig:
    """The gpt-oss-120b architecture: the 20b's with 36 layers and 128 experts.

    Args:
        config: the gpt-oss-20b config of ``train_step.make_setup``.
    """
    layer_types = ["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(36)]
    return GptOssConfig(**{**config.to_dict(), "num_hidden_layers": 36, "num_local_experts": 128,
                           "layer_types": layer_types})


def build_mxfp4_model(config: GptOssConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """gpt-oss with random weights built on ``device``: MXFP4-resident experts, everything else in ``dtype``.

    The model is created on the meta device; each layer's experts get random uint8 codes and the scale byte
    ``RANDOM_SCALE_BYTE``, zero biases; norms start at one, other biases at zero, every other weight from
    N(0, 0.02). The rotary embedding is rebuilt from the config.

    Args:
        config: the architecture.
        device: where the weights go.
        dtype: dtype of the non-expert weights and of the experts' computation.
        seed: seed of the random weights.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    widths = {"gate_up_proj": (config.hidden_size, 2 * config.intermediate_size),
              "down_proj": (config.intermediate_size, config.hidden_size)}
    for layer in model.model.layers:
        blocks, scales, biases = {}, {}, {}
        for name, (in_width, out_width) in widths.items():
            shape = (config.num_local_experts, out_width, in_width // BLOCK_SIZE)
            blocks[name] = torch.randint(0, 256, (*shape, BLOCK_SIZE // 2), generator=generator, device=device,
                                         dtype=torch.uint8)
            scales[name] = torch.full(shape, RANDOM_SCALE_BYTE, dtype=torch.uint8, device=device)
            biases[name] = torch.zeros(config.num_local_experts, out_width, dtype=dtype, device=device)
        layer.mlp.experts = Mxfp4Experts(config, blocks, scales, biases, dtype)
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.normal_(0.0, 0.02, generator=generator)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    model.activation_checkpointing_enable()
    return model.train()


def densify_experts(model: Any) -> None:
    """Replace every ``Mxfp4Experts`` by dense ``GptOssExperts`` holding its dequantised weights (same function).

    Args:
        model: a model from ``build_mxfp4_model`` (unwrapped).
    """
    for layer in model.model.layers:
        packed = layer.mlp.experts
        gate_up, down = packed.weight_stacks()
        with torch.device("meta"):
            dense = GptOssExperts(model.config)
        for name, stack in zip(EXPERT_STACKS, (gate_up, down)):
            dense._parameters[name] = nn.Parameter(stack.dequantize(), requires_grad=False)
            bias = getattr(packed, f"{name}_bias").detach()
            dense._parameters[f"{name}_bias"] = nn.Parameter(bias, requires_grad=False)
        layer.mlp.experts = dense.train()
        del packed, gate_up, down


def restore_input_embeddings(model: Any, device: torch.device) -> None:
    """Put a host-RAM input embedding (``offload_input_embeddings``) back on ``device`` as a plain ``nn.Embedding``.

    Args:
        model: the base model (unwrapped).
        device: where the table goes.
    """
    host = model.get_input_embeddings()
    if isinstance(host, HostEmbedding):
        table = host.weight.detach().to(device)
        model.set_input_embeddings(nn.Embedding.from_pretrained(table, freeze=True, padding_idx=host.padding_idx))


def breakdown(model: Any, peak_gib: float | None, optimizer_on_host: bool = False) -> dict[str, float]:
    """Where the peak goes: expert weights, other weights (on the device), LoRA state, and the rest.

    Args:
        model: the PEFT-wrapped model.
        peak_gib: the cell's peak.
        optimizer_on_host: AdamW's moments live in host RAM (``HostAdamW``): the device holds its two buckets.
    """
    experts = other = lora = 0
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is None or isinstance(module, HostEmbedding):
                continue
            size = tensor.untyped_storage().nbytes() if tensor.numel() else 0
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                # parameter, gradient, two AdamW moments (all in the parameter's dtype)
                lora += (2 if optimizer_on_host else 4) * size
            elif isinstance(module, (Mxfp4Experts, GptOssExperts)):
                experts += size
            else:
                other += size
    lora += 2 * BUCKET_BYTES if optimizer_on_host else 0
    parts = {"expert weights": experts / 2**30, "other weights": other / 2**30, "LoRA + grads + AdamW": lora / 2**30}
    if peak_gib is not None:
        parts["activations, workspace, scratch"] = peak_gib - sum(parts.values())
    return {key: round(value, 2) for key, value in parts.items()}


def run_cell(name: str, model: Any, setup: Setup, length: int, options: Options, seed: int,
             lean: Lean | None = None, snapshot: bool = False) -> MemoryCell:
    """Wrap ``model`` with osstune's LoRA, train one 1 x ``length`` batch for the timed steps, unwrap it.

    Args:
        name: the cell's label.
        model: the base model (unwrapped).
        setup: sizes and device (its config is the model's).
        length: tokens of the single sequence.
        options: step counts.
        seed: seed of the token ids.
        lean: a memory-lean setting (``Lean``), undone afterwards (the embedding goes back on the device); None:
            the whole layer's experts dequantised at once, every layer checkpointed on the device, AdamW on the
            device.
        snapshot: (CUDA) after the timed steps, print what is alive at a step's peak (``peak_composition``).
    """
    model.set_attn_implementation(resolve_attn_impl(None, gpt_oss=True, device=setup.device))
    table_bytes = 0
    lean = lean or Lean()
    if lean.embeddings:
        table = offload_input_embeddings(model).weight
        table_bytes = table.numel() * table.element_size()
        gc.collect()
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    torch.manual_seed(seed)  # the same LoRA A in every cell, so that their losses compare
    peft_model = apply_lora(model, LoraSpec(rank=8, alpha=16, dropout=0.0))
    layers = model.config.num_hidden_layers
    plan = plan_checkpointing("true", num_layers=layers, free_bytes=None, layer_bytes_full=[0] * layers,
                              layer_bytes_checkpointed=[0] * layers, reserve_bytes=0,
                              offload=lean.activations)
    offload = apply_checkpointing(peft_model, plan)
    if any(isinstance(module, Mxfp4Experts) for module in model.modules()):
        limit_dense_experts(model, lean.dense_experts)
    scenario = fixed_scenario(1, length, setup, torch.Generator().manual_seed(seed))
    linear_ce, _ = linear_cross_entropy(setup.device.type != "cuda", True)
    make_optimizer = partial(HostAdamW, lr=LEARNING_RATE) if lean.optimizer else None
    cell = measure(peft_model, name, scenario, True, linear_ce, "", setup, options, make_optimizer=make_optimizer)
    if snapshot and cell.status == "ok" and setup.device.type == "cuda":
        params = [param for param in peft_model.parameters() if param.requires_grad]
        optimizer = (make_optimizer or partial(torch.optim.AdamW, lr=LEARNING_RATE, fused=True))(params)
        batches = scenario.packed
        run_step = partial(train_step, peft_model, optimizer, batches, token_shares(batches), linear_ce)
        run_step()
        print(f"### {name}: what is alive at the step's peak", *peak_composition(run_step, setup.device), sep="\n",
              flush=True)
        del optimizer, run_step
        peft_model.zero_grad(set_to_none=True)
    steps = options.warmup + len(cell.step_s)
    host_gib = None
    if (lean.activations or lean.embeddings or lean.optimizer) and cell.status == "ok" and steps:
        moments = sum(2 * p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
        host_gib = round((table_bytes + (offload.bytes / steps if offload is not None else 0)
                          + (moments if lean.optimizer else 0)) / 2**30, 2)
    result = MemoryCell(name, cell.status, cell.tokens, cell.median_step_s, cell.tokens_per_s, cell.peak_gib,
                        breakdown(peft_model, cell.peak_gib, lean.optimizer), (cell.first_loss, cell.loss), host_gib)
    peft_model.unload()
    del peft_model
    restore_input_embeddings(model, setup.device)
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


PEAK_ROWS = 16
"""How many allocation sites ``peak_composition`` lists."""


def allocation_site(frames: Sequence[dict[str, Any]]) -> str:
    """Where an allocation was made: the innermost Python frame outside torch itself (``file:line function``).

    Args:
        frames: the allocation's stack as the allocator's history records it, innermost first.
    """
    for frame in frames:
        name = frame.get("filename", "")
        if name and "/torch/" not in name and not name.startswith("<"):
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return "torch internals" if frames else "(no stack)"


def peak_composition(run_step: Callable[[], Any], device: torch.device) -> list[str]:
    """Run one step with the CUDA allocator's history on and list what is alive at the step's peak.

    The trace is replayed (alloc: +size, free_completed: -size) from the memory allocated when recording starts
    (weights, LoRA state, optimizer moments), so the line ``before the step`` plus the listed sites add up to
    the step's peak.

    Args:
        run_step: one training step (the optimizer's moments already exist).
        device: the CUDA device.

    Returns:
        Markdown lines: the peak, the memory allocated before the step, and the ``PEAK_ROWS`` largest allocation
        sites alive at the peak with their GiB and block counts.
    """
    snapshot = None
    for context in ("all", None):
        # Python stacks first; torch 2.11 can fail to capture them inside a checkpoint's recompute under a custom
        # autograd Function, and then the blocks are listed by size instead of by site.
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=context, stacks="python")
        try:
            run_step()
            torch.cuda.synchronize(device)
            snapshot = torch.cuda.memory._snapshot()
        except SystemError as exc:
            print(f"memory history with Python stacks failed ({exc}); listing blocks by size", file=sys.stderr)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        if snapshot is not None:
            break
    if snapshot is None:
        return ["memory history unavailable"]
    trace = snapshot["device_traces"][device.index or 0]
    live: dict[int, tuple[int, str]] = {}
    current = peak = before
    peak_live: dict[int, tuple[int, str]] = {}
    for event in trace:
        if event["action"] == "alloc":
            frames = event.get("frames", [])
            site = allocation_site(frames) if frames else f"blocks of {event['size'] / 2**20:.1f} MiB"
            live[event["addr"]] = (event["size"], site)
            current += event["size"]
            if current > peak:
                peak, peak_live = current, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    sites: dict[str, list[int]] = {}
    for size, site in peak_live.values():
        entry = sites.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    lines = [f"peak {peak / 2**30:.2f} GiB = before the step {before / 2**30:.2f} GiB + allocated in the step:",
             "| site | GiB | blocks |", "|---|---:|---:|"]
    for site, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:PEAK_ROWS]:
        lines.append(f"| {site} | {size / 2**30:.3f} | {count} |")
    return lines


def max_context(setup: Setup, lengths: Sequence[int], cap_gib: float, lean: Lean, seed: int,
                done: Callable[[MemoryCell], None]) -> int | None:
    """The longest of ``lengths`` (ascending) that trains as one sequence on the 20b under an allocator capped at
    ``cap_gib`` (``torch.cuda.set_per_process_memory_fraction``, so the cap is real): one step per length, MXFP4
    experts, ``lean``, until one runs out of memory. The cap stays in place afterwards.

    Args:
        setup: the 20b's sizes and device.
        lengths: sequence lengths to try, ascending.
        cap_gib: the allocator cap.
        lean: the memory-lean setting of every try.
        seed: seed of the weights and token ids.
        done: receives each try's cell.

    Returns:
        The longest length that trained, or None.
    """
    if setup.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(setup.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), torch.cuda.current_device())
    model = build_mxfp4_model(setup.config, setup.device, setup.dtype, seed)
    best = None
    for context in lengths:
        cell = run_cell(f"20b mxfp4 lean {lean.label} max context 1x{context} (cap {cap_gib:g} GiB)", model, setup,
                        context, Options(0, 1, 1e9), seed, lean=lean)
        done(cell)
        if cell.status != "ok":
            break
        best = context
    print(f"max context under {cap_gib:g} GiB: {best if best else 'none of the lengths'}", flush=True)
    del model
    gc.collect()
    return best


def report(cell: MemoryCell, cells: list[MemoryCell], out_dir: str | None) -> None:
    """Print a cell's line and save everything so far.

    Args:
        cell: the new cell.
        cells: every cell, the new one included.
        out_dir: the OUT folder, or None.
    """
    rate = f"{cell.tokens_per_s:,.0f}" if cell.tokens_per_s else "-"
    peak = f"{cell.peak_gib:.2f}" if cell.peak_gib is not None else "-"
    host = f"{cell.host_gib:.2f}" if cell.host_gib is not None else "-"
    print(f"| {cell.name} | {cell.status} | {cell.tokens:,} | {rate} | {peak} | {host} | "
          f"{', '.join(f'{key} {value}' for key, value in cell.breakdown_gib.items())} |", flush=True)
    save([asdict(item) for item in cells], out_dir, "memory.json")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU, to check the harness")
    parser.add_argument("--cells", default="20b,120b,maxctx", help="comma-separated, from 20b, 120b, maxctx")
    parser.add_argument("--length", type=int, default=4096, help="tokens of the 20b / 120b cells' sequence")
    parser.add_argument("--context-lengths", default="65536,131072",
                        help="sequence lengths the maxctx cell tries, ascending")
    parser.add_argument("--memory-cap-gib", type=float, default=80.0, help="allocator cap of the maxctx cell")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell (maxctx: none)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell (maxctx: one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids")
    parser.add_argument("--lean", default=DEFAULT_LEAN,
                        help="comma-separated memory-lean settings for the 20b cells (the first also for the 120b "
                             "and maxctx cells), each +-joined from dN, acts, emb, opt (see Lean)")
    parser.add_argument("--snapshot", action="store_true",
                        help="(CUDA) list what is alive at the peak of one more step of each 20b cell")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen cells and print a markdown table.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).
    """
    args = parse_args(argv)
    cells_wanted = [name.strip() for name in args.cells.split(",") if name.strip()]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch._dynamo.config.recompile_limit = 64
    setup = make_setup(args.tiny, 4)
    length = 128 if args.tiny else args.length
    options = Options(args.warmup, args.steps, 120.0)
    out_dir = os.environ.get("OUT")
    cells: list[MemoryCell] = []
    print("| cell | status | tokens | tokens/s | peak GiB | host GiB | breakdown GiB |\n"
          "|---|---|---:|---:|---:|---:|---|", flush=True)

    def done(cell: MemoryCell) -> None:
        cells.append(cell)
        report(cell, cells, out_dir)

    leans = [Lean.parse(text) for text in args.lean.split(",")]
    if "20b" in cells_wanted:
        started = time.perf_counter()
        model = build_mxfp4_model(setup.config, setup.device, setup.dtype, args.seed)
        print(f"20b built in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        packed = run_cell(f"20b mxfp4 1x{length}", model, setup, length, options, args.seed,
                          snapshot=args.snapshot)
        done(packed)
        lean_cells = []
        for lean in leans:
            lean_cells.append(run_cell(f"20b mxfp4 lean {lean.label} 1x{length}", model, setup, length, options,
                                       args.seed, lean=lean, snapshot=args.snapshot))
            done(lean_cells[-1])
        densify_experts(model)
        dense = run_cell(f"20b bf16 1x{length}", model, setup, length, options, args.seed, snapshot=args.snapshot)
        done(dense)
        for cell in (packed, *lean_cells):
            if cell.tokens_per_s and dense.tokens_per_s:
                print(f"ratio {cell.name} / bf16 tokens/s: {cell.tokens_per_s / dense.tokens_per_s:.2f}")
        del model
        gc.collect()
    if "120b" in cells_wanted:
        config = setup.config if args.tiny else gpt_oss_120b(setup.config)
        big = replace(setup, config=config)
        started = time.perf_counter()
        model = build_mxfp4_model(config, setup.device, setup.dtype, args.seed)
        print(f"120b built in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        done(run_cell(f"120b mxfp4 1x{length}", model, big, length, options, args.seed))
        done(run_cell(f"120b mxfp4 lean {leans[0].label} 1x{length}", model, big, length, options, args.seed,
                      lean=leans[0]))
        del model
        gc.collect()
    if "maxctx" in cells_wanted:
        lengths = [256, 512] if args.tiny else [int(item) for item in args.context_lengths.split(",")]
        max_context(setup, lengths, args.memory_cap_gib, leans[0], args.seed, done)
    return 1 if any(cell.status.startswith("error") for cell in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
