"""Side-by-side LoRA training-step benchmark on the gpt-oss-20b architecture with random weights (issue "Speed").

Builds gpt-oss-20b from its config (24 layers, hidden 2880, 64 query heads x 64, 8 KV heads, 32 experts top-4,
vocab 201088, sliding window 128 on alternating layers) directly on the GPU in bf16 with random weights, once;
nothing is downloaded. Each stack then wraps that model with PEFT, is timed, and is unwrapped again:

- ``seed``: the seed recipe as the TRL tutorial writes it: eager attention, the per-expert loop of transformers
  (``experts_implementation="eager"``), PEFT ``target_modules="all-linear"`` plus ``target_parameters`` on the
  experts of layers 7/15/23, the model's own loss.
- ``hf_best``: the best Hugging Face stack: flex_attention, grouped_mm experts, PEFT on all-linear plus the experts
  of all layers, liger's fused linear cross-entropy (the HF loss when liger is not importable) and liger's RMSNorm
  and rotary embedding, as ``use_liger_kernel=True`` applies them in the Trainer (``liger_layer_kernels``).
- ``osstune``: ``apply_lora(model, LoraSpec(rank=8, alpha=16, dropout=0.0))`` (attention plus the experts of all
  layers on the grouped ``(X @ A) @ B`` forward with its fused kernels), the experts kept as MXFP4 blocks/scales
  (``--expert_weights mxfp4``; the model's expert weights are rounded to MXFP4 values at build time, as gpt-oss
  ships them, so every stack computes the same function), ``--gradient_checkpointing auto`` planned within
  ``hf_best``'s peak on the same scenario, flex_attention, liger's RMSNorm and RoPE as ``hf_best``, osstune's
  fused linear cross-entropy (``osstune.kernels.cross_entropy``, what ``osstune sft --use_liger_kernel true``
  trains gpt-oss with) where ``hf_best`` runs liger's, the attention masks of ``install_attention_masks``
  (as ``osstune sft`` installs them: block masks of unpadded batches built once per shape), and padding-free
  packing (``PackingCollator``) for the real-length mix.
  ``--osstune-variants`` adds rows that change one of these (``VARIANTS``).

All stacks: LoRA r=8, alpha 16, no dropout, bf16 weights; ``seed`` and ``hf_best`` checkpoint every layer
(non-reentrant). One step is
forward + backward + AdamW (fused on CUDA) over the LoRA parameters. Scenarios: ``4x2048`` random tokens; ``mix``,
a real-length mix (lengths from a lognormal clipped to [32, 4096], mean about 1k, drawn with a fixed seed until
16384 tokens), padded into micro-batches of ``--pad-batch`` samples with gradient accumulation for ``seed`` and
``hf_best`` (as the TRL recipe's per_device_train_batch_size 4 does) and packed into one row for ``osstune``; and
``1x16384``. tokens/s counts non-pad tokens; the step time is the median of the timed steps; peak GiB is
``torch.cuda.max_memory_allocated`` over the cell (weights included). An out-of-memory error or any other failure
ends only its cell.

Prints a markdown table and ``ratio osstune/hf_best <scenario>: X.XX`` / ``ratio osstune/seed <scenario>: X.XX``
lines; with OUT set, writes every number to ``$OUT/train_step.json`` (rewritten after each cell). ``--tiny`` runs
the same code with a tiny config on the CPU in seconds (eager attention, a plain PyTorch linear cross-entropy in
place of liger's kernel), to check the harness. How to run it on a GPU machine: bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import MethodType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GptOssConfig

from osstune.chat.options import IGNORE_INDEX
from osstune.models.gpt_oss.moe_lora import expert_target_parameters
from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from osstune.models.gpt_oss.mxfp4_experts import EXPERT_STACKS, Mxfp4Experts
from osstune.models.loading import resolve_attn_impl
from osstune.models.lora import LoraSpec, apply_lora, trainable_summary
from osstune.train.collator import (
    PackingCollator,
    PaddingCollator,
    count_trained_tokens,
    install_attention_masks,
)

STACKS: tuple[str, ...] = ("seed", "hf_best", "osstune")
"""The stacks, in the order they run."""

VARIANTS: tuple[str, ...] = ("bf16", "ckptall", "nockpt", "compile_moe", "compile_layer")
"""Extra osstune rows (``--osstune-variants``), each changing one thing of the ``osstune`` stack: ``bf16`` = dense
bf16 experts instead of MXFP4-resident ones; ``ckptall`` / ``nockpt`` = every layer / no layer checkpointed instead
of ``--gradient_checkpointing auto``; ``compile_moe`` / ``compile_layer`` = ``torch.compile`` of each decoder layer's
MoE block / whole decoder layer. Several can be joined with ``+``, e.g. ``bf16+ckptall``."""

SCENARIOS: tuple[str, ...] = ("fixed", "mix", "long")
"""Scenario kinds: the short fixed batch, the real-length mix, the single long sequence."""

MAX_CONTEXT = "maxctx"
"""The max-context scenario (only when asked for in ``--scenarios``): osstune alone, the longest single sequence
that trains under ``--memory-cap-gib`` (``memory.max_context``), after the other scenarios."""

LORA_RANK = 8
LORA_ALPHA = 16
LEARNING_RATE = 2e-4

LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(lm_head weight [V, H], hidden [N, H], targets [N]) -> mean cross-entropy over targets not IGNORE_INDEX``."""


@dataclass(frozen=True)
class Setup:
    """What one run builds and feeds.

    Args:
        config: the model's config.
        device: where the model and batches live.
        dtype: the weights' dtype.
        fixed_batch: ``(rows, length)`` of the short fixed scenario.
        long_length: length of the single-sequence scenario.
        mix_tokens: tokens per step of the real-length mix.
        mix_lengths: ``(min, max)`` sample length of the mix.
        mix_lognormal: ``(mu, sigma)`` of the lognormal the mix's lengths are drawn from (before clipping).
        pad_batch: samples per padded micro-batch of the mix, for the stacks that pad.
        seed_layers: layers whose experts the seed recipe targets.
    """

    config: GptOssConfig
    device: torch.device
    dtype: torch.dtype
    fixed_batch: tuple[int, int]
    long_length: int
    mix_tokens: int
    mix_lengths: tuple[int, int]
    mix_lognormal: tuple[float, float]
    pad_batch: int
    seed_layers: tuple[int, ...]


@dataclass
class Scenario:
    """One workload, batched the way each kind of stack feeds it.

    Args:
        name: label in the table, e.g. ``4x2048``.
        padded: micro-batches of one step for stacks that pad (all on the device).
        packed: micro-batches of one step for stacks that pack padding-free (the same as ``padded`` when the
            scenario has no padding).
        tokens: non-pad tokens of one step.
        padded_detail: how ``padded`` is batched, for the notes column.
        packed_detail: how ``packed`` is batched, for the notes column.
        lengths: the sample lengths of the step.
    """

    name: str
    padded: list[dict[str, torch.Tensor]]
    packed: list[dict[str, torch.Tensor]]
    tokens: int
    padded_detail: str
    packed_detail: str
    lengths: list[int]


@dataclass
class Cell:
    """The measurement of one stack on one scenario.

    Args:
        stack: the stack's name.
        scenario: the scenario's name.
        status: ``ok``, ``OOM`` or ``error: ...``.
        tokens: non-pad tokens per step.
        positions: token positions computed per step, pads included.
        step_s: time of each timed step, seconds.
        peak_gib: peak allocated device memory over the cell, GiB (None on the CPU).
        first_loss: loss of the first step (LoRA B starts at zero, so every stack starts from the base model's
            loss on the scenario: a check that the stacks compute the same function).
        loss: loss of the last step.
        notes: the stack's pieces and the batching, for the table.
    """

    stack: str
    scenario: str
    status: str
    tokens: int
    positions: int
    step_s: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    first_loss: float | None = None
    loss: float | None = None
    notes: str = ""

    @property
    def median_step_s(self) -> float | None:
        """Median of the timed steps, or None when none ran."""
        return statistics.median(self.step_s) if self.step_s else None

    @property
    def tokens_per_s(self) -> float | None:
        """Non-pad tokens per second at the median step time, or None when none ran."""
        median = self.median_step_s
        return self.tokens / median if median else None


@dataclass
class Options:
    """Timing options.

    Args:
        warmup: untimed steps per cell (they absorb kernel compilation).
        steps: timed steps per cell.
        max_cell_s: stop timing a cell once its timed steps took this long (at least one step runs).
    """

    warmup: int
    steps: int
    max_cell_s: float


def make_setup(tiny: bool, pad_batch: int) -> Setup:
    """The run's model config and scenario sizes.

    Args:
        tiny: a tiny model and tiny scenarios on the CPU (to check the harness) instead of gpt-oss-20b on CUDA.
        pad_batch: samples per padded micro-batch of the real-length mix.

    Raises:
        SystemExit: the full benchmark without CUDA.
    """
    common = {"use_cache": False, "swiglu_limit": 7.0, "rope_theta": 150000.0}
    if tiny:
        config = GptOssConfig(
            num_hidden_layers=4, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512, sliding_window=16,
            pad_token_id=511, **common,
        )
        # A lognormal with mu 3.0, sigma 1 clipped to [8, 128] has mean about 31: the full mix scaled by 1/32.
        return Setup(config, torch.device("cpu"), torch.bfloat16, (4, 64), 512, 512, (8, 128), (3.0, 1.0),
                     pad_batch, (1, 3))
    if not torch.cuda.is_available():
        raise SystemExit("the full benchmark needs a CUDA GPU; use --tiny to check the harness on the CPU")
    config = GptOssConfig(
        num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
        num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
        pad_token_id=199999, **common,
    )
    # mu 6.5, sigma 1 clipped to [32, 4096]: median ~670 tokens, mean ~1.01k, 3.5% of draws clipped to 4096.
    return Setup(config, torch.device("cuda"), torch.bfloat16, (4, 2048), 16384, 16384, (32, 4096), (6.5, 1.0),
                 pad_batch, (7, 15, 23))


def build_model(setup: Setup) -> Any:
    """gpt-oss from ``setup.config`` with random weights, created directly on ``setup.device``, in training mode.

    The expert weights are rounded to MXFP4 values (``round_experts_to_mxfp4``), as gpt-oss ships them, so the
    ``mxfp4`` variant computes the same function. Activation checkpointing (non-reentrant) is switched on;
    attention and experts implementations are set per stack later.

    Args:
        setup: the run's setup.
    """
    with setup.device:
        model = AutoModelForCausalLM.from_config(setup.config, dtype=setup.dtype, attn_implementation="eager")
    model.activation_checkpointing_enable()
    round_experts_to_mxfp4(model)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    return model.train()


def sample_lengths(setup: Setup, rng: np.random.Generator) -> list[int]:
    """Sample lengths of one step of the real-length mix, totalling ``setup.mix_tokens``.

    Lengths are drawn from a lognormal clipped to ``setup.mix_lengths`` until the budget is filled; the last one
    is cut to what is left of the budget, or dropped when that is below the minimum length.

    Args:
        setup: the run's setup.
        rng: the random generator.
    """
    low, high = setup.mix_lengths
    mu, sigma = setup.mix_lognormal
    lengths: list[int] = []
    left = setup.mix_tokens
    while left >= low:
        length = min(int(np.clip(rng.lognormal(mu, sigma), low, high)), left)
        lengths.append(length)
        left -= length
    return lengths


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch's tensors on ``device``, without the bookkeeping keys."""
    return {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def fixed_scenario(rows: int, length: int, setup: Setup, generator: torch.Generator) -> Scenario:
    """A batch of random tokens without padding, fed the same way to every stack.

    Args:
        rows: sequences in the batch.
        length: tokens per sequence.
        setup: the run's setup.
        generator: the random generator of the token ids.
    """
    ids = torch.randint(0, setup.config.vocab_size, (rows, length), generator=generator)
    batch = {"input_ids": ids.to(setup.device), "labels": ids.clone().to(setup.device)}
    detail = f"1 batch {rows}x{length}, no padding"
    return Scenario(f"{rows}x{length}", [batch], [batch], rows * length, detail, detail, [length] * rows)


def mix_scenario(setup: Setup, rng: np.random.Generator, generator: torch.Generator) -> Scenario:
    """The real-length mix: padded micro-batches for the padding stacks, one packed row for osstune.

    Args:
        setup: the run's setup.
        rng: the generator of the lengths.
        generator: the generator of the token ids.
    """
    lengths = sample_lengths(setup, rng)
    items = []
    for length in lengths:
        ids = torch.randint(0, setup.config.vocab_size, (length,), generator=generator)
        items.append({"input_ids": ids, "labels": ids.clone()})
    pad = PaddingCollator(setup.config.pad_token_id)
    groups = [items[start:start + setup.pad_batch] for start in range(0, len(items), setup.pad_batch)]
    padded = [_to_device(pad(group), setup.device) for group in groups]
    packed = [_to_device(PackingCollator()(items), setup.device)]
    tokens = sum(lengths)
    positions = sum(batch["input_ids"].numel() for batch in padded)
    padded_detail = (
        f"{len(lengths)} samples in {len(padded)} padded micro-batches of <= {setup.pad_batch} "
        f"({positions:,} positions, {100 * (1 - tokens / positions):.0f}% pad)"
    )
    packed_detail = f"{len(lengths)} samples packed in 1 row of {tokens:,}, per-sample attention"
    return Scenario("mix", padded, packed, tokens, padded_detail, packed_detail, lengths)


def make_scenarios(setup: Setup, kinds: Sequence[str], seed: int) -> list[Scenario]:
    """The chosen scenarios, in ``SCENARIOS`` order, drawn from fixed seeds.

    Args:
        setup: the run's setup.
        kinds: names from ``SCENARIOS``.
        seed: seed of the token ids and the mix's lengths.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenarios = []
    for kind in SCENARIOS:
        if kind not in kinds:
            continue
        if kind == "fixed":
            scenarios.append(fixed_scenario(*setup.fixed_batch, setup, generator))
        elif kind == "mix":
            scenarios.append(mix_scenario(setup, rng, generator))
        else:
            scenarios.append(fixed_scenario(1, setup.long_length, setup, generator))
    return scenarios


def linear_cross_entropy(tiny: bool, use_liger: bool) -> tuple[LinearCrossEntropy | None, str]:
    """The fused linear cross-entropy that ``hf_best`` and ``osstune`` use, and how it is labelled.

    Args:
        tiny: on the CPU: a plain PyTorch linear cross-entropy stands in for liger's kernel, so that the same
            code path runs.
        use_liger: use liger's kernel when it imports.

    Returns:
        The function, or None (with the reason) when the model's own loss is to be used.
    """
    if tiny:
        def reference(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)

        return reference, "torch linear CE (liger stand-in, --tiny)"
    if not use_liger:
        return None, "HF loss (liger off)"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        return None, f"HF loss (liger not importable: {exc.__class__.__name__})"
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX), "liger fused linear CE"


def osstune_linear_cross_entropy(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """osstune's fused linear cross-entropy (``osstune.kernels.cross_entropy``: chunks of 512 MiB of logits), the
    loss of the ``osstune`` stacks wherever ``hf_best`` runs liger's.

    Args:
        weight: the output embedding ``[V, H]``.
        hidden: ``[N, H]`` hidden states.
        targets: ``[N]`` shifted labels.
    """
    from osstune.kernels.cross_entropy import linear_cross_entropy as fused

    return fused(hidden, weight, targets)


def liger_layer_kernels(model: Any) -> tuple[Callable[[], None] | None, str]:
    """Put liger-kernel's RMSNorm and rotary embedding into the model's decoder, as ``use_liger_kernel=True`` does
    in the Hugging Face Trainer (TRL's recipe flag, and ``osstune sft --use_liger_kernel true``): every
    ``GptOssRMSNorm`` instance runs ``LigerRMSNorm.forward`` (llama casting, in place), and transformers' gpt-oss
    module calls liger's rotary embedding.

    Args:
        model: the unwrapped gpt-oss model, on CUDA.

    Returns:
        A function that undoes both (None when liger does not import) and a label for the notes.
    """
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb_gpt_oss
    except ImportError as exc:
        return None, f"HF RMSNorm and RoPE (liger not importable: {exc.__class__.__name__})"
    from transformers.models.gpt_oss import modeling_gpt_oss

    norms = [module for module in model.modules() if isinstance(module, modeling_gpt_oss.GptOssRMSNorm)]
    added = ("offset", "casting_mode", "in_place", "row_mode", "forward")
    for norm in norms:
        norm.offset, norm.casting_mode, norm.in_place, norm.row_mode = 0.0, "llama", True, None
        norm.forward = MethodType(LigerRMSNorm.forward, norm)
    rope = modeling_gpt_oss.apply_rotary_pos_emb
    modeling_gpt_oss.apply_rotary_pos_emb = liger_rotary_pos_emb_gpt_oss

    def undo() -> None:
        modeling_gpt_oss.apply_rotary_pos_emb = rope
        for norm in norms:
            for name in added:
                norm.__dict__.pop(name, None)

    return undo, "liger RMSNorm + RoPE"


def step_loss(model: PeftModel, batch: dict[str, torch.Tensor], linear_ce: LinearCrossEntropy | None) -> torch.Tensor:
    """The mean loss of one micro-batch over its trained positions.

    Args:
        model: the PEFT-wrapped gpt-oss.
        batch: ``input_ids`` and ``labels`` (unshifted), optionally ``attention_mask`` and ``position_ids``.
        linear_ce: a fused linear cross-entropy over the decoder's hidden states, or None for the model's own loss
            (which materialises the logits).
    """
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if linear_ce is None:
        return model(**inputs, labels=batch["labels"], use_cache=False).loss
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(**inputs, use_cache=False).last_hidden_state
    return linear_ce(
        causal_lm.lm_head.weight,
        hidden[:, :-1].reshape(-1, hidden.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
    )


def token_shares(batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """Each micro-batch's share of the step's trained positions: weighting micro-batch means by it gives the token
    mean over the step, as the Trainer's ``num_items_in_batch`` does.

    Args:
        batches: the step's micro-batches.
    """
    trained = [count_trained_tokens(batch["labels"].cpu()) for batch in batches]
    return [count / sum(trained) for count in trained]


def train_step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict[str, torch.Tensor]],
    shares: Sequence[float],
    linear_ce: LinearCrossEntropy | None,
) -> torch.Tensor:
    """One optimizer step over micro-batches with gradient accumulation; the step loss is a token mean.

    Args:
        model: the PEFT-wrapped gpt-oss.
        optimizer: the optimizer of the LoRA parameters.
        batches: the step's micro-batches.
        shares: each micro-batch's share of the trained positions (``token_shares``).
        linear_ce: see ``step_loss``.

    Returns:
        The step's loss (detached, on the device).
    """
    step = torch.zeros((), device=batches[0]["input_ids"].device)
    for batch, share in zip(batches, shares):
        loss = step_loss(model, batch, linear_ce) * share
        loss.backward()
        step += loss.detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step


def time_steps(
    run_step: Callable[[], torch.Tensor], device: torch.device, options: Options
) -> tuple[list[float], float, float]:
    """Run warmup steps, then timed steps, synchronising with the device around each.

    Args:
        run_step: one training step; returns its loss.
        device: the device to synchronise with.
        options: step counts and the time cap.

    Returns:
        The timed steps' durations in seconds, the first step's loss and the last step's loss.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses = []
    for _ in range(options.warmup):
        losses.append(run_step())
        sync()
    times: list[float] = []
    while len(times) < options.steps and sum(times) < options.max_cell_s:
        start = time.perf_counter()
        losses.append(run_step())
        sync()
        times.append(time.perf_counter() - start)
    return times, float(losses[0]), float(losses[-1])


KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flex_attention", "attn", "flash", "fmha")),
    ("loss", ("cross_entropy", "liger", "_ce_")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "grouped", "matmul", "mm_")),
    ("index/sort", ("index", "scatter", "gather", "sort", "radix", "searchsorted", "cub::", "embedding")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("reduce", ("reduce", "norm", "sum_")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_", "copy", "fill", "cat")),
)
"""Kernel-name fragments (lower case) that place a GPU kernel in a profile category, first match wins."""


def kernel_kind(name: str) -> str:
    """The profile category of a GPU kernel, from its name (``KERNEL_KINDS``), else ``other``.

    Args:
        name: the kernel's name as the profiler reports it.
    """
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(part in lowered for part in parts)), "other")


def profile_step(run_step: Callable[[], torch.Tensor], label: str, rows: int = 25) -> str:
    """Run one step under the PyTorch profiler and summarise where the GPU time goes.

    Args:
        run_step: one training step.
        label: what was profiled, for the heading.
        rows: how many of the most expensive kernels to list.

    Returns:
        Markdown: GPU time per kernel category, then the top kernels by GPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [event for event in prof.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA
               and event.self_device_time_total > 0]
    total = sum(event.self_device_time_total for event in kernels)
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_device_time_total
    lines = [f"### profile: {label} (one step; wall {wall * 1e3:.0f} ms under the profiler, GPU busy "
             f"{total / 1e3:.0f} ms)", "", "| kind | GPU ms | share |", "|---|---:|---:|"]
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {micros / 1e3:.1f} | {micros / total:.1%} |")
    lines += ["", "| kernel | kind | calls | GPU ms | share |", "|---|---|---:|---:|---:|"]
    for event in sorted(kernels, key=lambda item: -item.self_device_time_total)[:rows]:
        name = event.key.replace("|", "/")[:110]
        lines.append(f"| {name} | {kernel_kind(event.key)} | {event.count} | {event.self_device_time_total / 1e3:.1f} "
                     f"| {event.self_device_time_total / total:.1%} |")
    return "\n".join(lines)


def _free(model: torch.nn.Module, device: torch.device) -> None:
    """Drop gradients, collect garbage and return cached device memory.

    Args:
        model: the model whose gradients are dropped.
        device: the device whose cache is emptied.
    """
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    model: PeftModel,
    stack: str,
    scenario: Scenario,
    packs: bool,
    linear_ce: LinearCrossEntropy | None,
    pieces: str,
    setup: Setup,
    options: Options,
    profile_sink: Callable[[str], None] | None = None,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> Cell:
    """Time one stack on one scenario; an out-of-memory error or another failure is recorded, not raised.

    Args:
        model: the stack's PEFT-wrapped model.
        stack: the stack's name.
        scenario: the workload.
        packs: whether the stack takes the packed batches (else the padded ones).
        linear_ce: see ``step_loss``.
        pieces: the stack's pieces, for the notes.
        setup: the run's setup.
        options: step counts and the time cap.
        profile_sink: when given (CUDA only), one more step runs under the profiler after the timed steps and
            its summary (``profile_step``) is passed to this.
        make_optimizer: builds the optimizer of the trained parameters (default: fused AdamW on CUDA).
    """
    batches = scenario.packed if packs else scenario.padded
    detail = scenario.packed_detail if packs else scenario.padded_detail
    cell = Cell(stack, scenario.name, "ok", scenario.tokens, sum(b["input_ids"].numel() for b in batches),
                notes=f"{pieces}; {detail}")
    params = [param for param in model.parameters() if param.requires_grad]
    if make_optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True if setup.device.type == "cuda" else None)
    else:
        optimizer = make_optimizer(params)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    run_step = partial(train_step, model, optimizer, batches, token_shares(batches), linear_ce)
    try:
        cell.step_s, cell.first_loss, cell.loss = time_steps(run_step, setup.device, options)
        if profile_sink is not None and setup.device.type == "cuda":
            profile_sink(profile_step(run_step, f"{stack} {scenario.name}"))
    except torch.OutOfMemoryError:
        cell.status = "OOM"
    except Exception as exc:  # noqa: BLE001 - one broken cell must not end the run; the traceback goes to stderr
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0][:160].replace("|", "/")
        cell.status = f"error: {exc.__class__.__name__}: {first_line}"
    if setup.device.type == "cuda":
        cell.peak_gib = torch.cuda.max_memory_allocated(setup.device) / 2**30
    if cell.status == "ok" and len(cell.step_s) < options.steps:
        cell.notes += f"; {len(cell.step_s)} of {options.steps} timed steps (--max-cell-s)"
    del optimizer
    _free(model, setup.device)
    return cell


def _quiet_peft_wrap(model: Any, config: LoraConfig) -> PeftModel:
    """``get_peft_model`` without the deprecation warning PEFT triggers in transformers while wrapping.

    Args:
        model: the base model.
        config: the LoRA config.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def wrap(stack: str, model: Any, setup: Setup, loss_label: str) -> tuple[PeftModel, str]:
    """Configure the base model for a stack and put that stack's LoRA on it.

    Args:
        stack: a name from ``STACKS``.
        model: the base model (unwrapped).
        setup: the run's setup.
        loss_label: how the loss of ``hf_best`` and ``osstune`` is computed.

    Returns:
        The PEFT model and a description of the stack's pieces.
    """
    cuda = setup.device.type == "cuda"
    layers = setup.config.num_hidden_layers
    if stack == "seed":
        model.set_attn_implementation("eager")
        model.set_experts_implementation("eager")
        targets = expert_target_parameters(setup.config, setup.seed_layers)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                            target_parameters=targets, task_type="CAUSAL_LM")
        peft_model = _quiet_peft_wrap(model, config)
        chosen = ",".join(str(layer) for layer in setup.seed_layers)
        return peft_model, (f"attn eager; experts eager (per-expert loop); PEFT all-linear + experts of layers "
                            f"{chosen} (ParamWrapper); HF loss")
    if stack == "hf_best":
        attn = "flex_attention" if cuda else "eager"
        model.set_attn_implementation(attn)
        model.set_experts_implementation("grouped_mm")
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                            target_parameters=expert_target_parameters(setup.config, "all"), task_type="CAUSAL_LM")
        peft_model = _quiet_peft_wrap(model, config)
        return peft_model, (f"attn {attn}; experts grouped_mm; PEFT all-linear + experts of all {layers} layers "
                            f"(ParamWrapper); {loss_label}")
    attn = resolve_attn_impl(None, gpt_oss=True, device=setup.device)
    model.set_attn_implementation(attn)
    model.set_experts_implementation("grouped_mm")
    peft_model = apply_lora(model, LoraSpec(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0))
    return peft_model, (f"attn {attn}; osstune apply_lora: attention + experts of all {layers} layers, grouped "
                        f"(X@A)@B; {loss_label}")


def auto_checkpointing(model: PeftModel, scenario: Scenario, budget: float | None, fused_norm: bool) -> str:
    """Apply ``--gradient_checkpointing auto`` for the scenario's packed batch, planned against ``budget``.

    The plan is osstune's own (``plan_checkpointing`` with the per-layer sizes of ``osstune.models.memory``); what
    it may use is ``budget`` (else the device's free memory) minus what is allocated now, minus the LoRA gradients
    and AdamW state still to come, the activations outside the layers and a headroom of
    ``checkpointing.AUTO_HEADROOM`` of the budget.

    Args:
        model: the osstune stack's PEFT model, on CUDA.
        scenario: the workload (its packed micro-batch sets the shape).
        budget: peak bytes to plan for, or None.
        fused_norm: liger's RMSNorm is in the model (``liger_layer_kernels``).

    Returns:
        The plan's one-line description.
    """
    from osstune.models.memory import TrainingShape, activation_overhead_bytes, layer_activation_sizes
    from osstune.train.checkpointing import AUTO_HEADROOM, apply_checkpointing, device_memory, plan_checkpointing
    from osstune.train.dry_run import lora_layout

    rows, length = scenario.packed[0]["input_ids"].shape
    config = model.config.to_dict()
    shape = TrainingShape(micro_batch=rows, seq_len=length, checkpointing=True, attn_impl="flex_attention",
                          fused_loss=True, fused_norm=fused_norm)
    full, inputs = layer_activation_sizes(config, lora=lora_layout(model), shape=shape, dtype_bytes=2)
    device = next(model.parameters()).device
    free, total = device_memory(device) or (0, 0)
    limit = budget if budget is not None else torch.cuda.memory_allocated(device) + free
    trainable = sum(param.numel() * param.element_size() for param in model.parameters() if param.requires_grad)
    reserve = 3 * trainable + activation_overhead_bytes(config, shape=shape, dtype_bytes=2) + AUTO_HEADROOM * limit
    plan = plan_checkpointing("auto", num_layers=len(full), free_bytes=int(limit - torch.cuda.memory_allocated(device)),
                              layer_bytes_full=full, layer_bytes_checkpointed=inputs, reserve_bytes=int(reserve),
                              offload=False, micro_batch=(rows, length))
    apply_checkpointing(model, plan)
    return plan.describe()


def park_dense_experts(model: Any) -> list[Any]:
    """Give every layer MXFP4-resident experts (``Mxfp4Experts``) encoding its dense experts, which go to host RAM.

    ``build_model`` already rounded the dense experts to MXFP4 values, so the function does not change.

    Args:
        model: the base model (unwrapped).

    Returns:
        The dense expert modules, in layer order, for ``restore_dense_experts``.
    """
    parked = []
    for layer in model.model.layers:
        dense = layer.mlp.experts
        blocks, scales = {}, {}
        for name in EXPERT_STACKS:
            blocks[name], scales[name] = quantize_mxfp4(getattr(dense, name).detach())
        biases = {name: getattr(dense, f"{name}_bias").detach() for name in EXPERT_STACKS}
        layer.mlp.experts = Mxfp4Experts(model.config, blocks, scales, biases, dense.gate_up_proj.dtype).train()
        parked.append(dense.to("cpu"))
    return parked


def restore_dense_experts(model: Any, parked: Sequence[Any]) -> None:
    """Undo ``park_dense_experts``: the dense experts come back to the device.

    Args:
        model: the base model (unwrapped).
        parked: what ``park_dense_experts`` returned (nothing happens when empty).
    """
    device = model.model.embed_tokens.weight.device
    for layer, dense in zip(model.model.layers, parked):
        layer.mlp.experts = dense.to(device)


def round_experts_to_mxfp4(model: Any) -> None:
    """Replace every dense expert weight by its MXFP4 encoding's value, in place, as a shipped checkpoint holds.

    Args:
        model: the base model (unwrapped).
    """
    with torch.no_grad():
        for layer in model.model.layers:
            for name in EXPERT_STACKS:
                weight = getattr(layer.mlp.experts, name)
                weight.copy_(dequantize_mxfp4(*quantize_mxfp4(weight), weight.dtype))


def compile_layers(model: Any, options_on: set[str]) -> str:
    """``torch.compile`` the forward of each decoder layer (``compile_layer``) or of its MoE block (``compile_moe``).

    Args:
        model: the base model (its modules are shared with the PEFT wrapper).
        options_on: the osstune variant's options; without a compile option nothing is compiled.

    Returns:
        What was compiled, for the notes (empty when nothing was).
    """
    variant = next((name for name in ("compile_moe", "compile_layer") if name in options_on), None)
    if variant is None:
        return ""
    layers = model.model.layers
    targets = [layer.mlp for layer in layers] if variant == "compile_moe" else list(layers)
    for module in targets:
        module.forward = torch.compile(module.forward, dynamic=False)
    return f"torch.compile of {len(targets)} {'MoE blocks' if variant == 'compile_moe' else 'decoder layers'}"


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``compile_layers`` replaced the module's forward.

    Args:
        module: any module.
    """
    forward = module.__dict__.get("forward")
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


def run_stack(
    stack: str,
    model: Any,
    scenarios: Sequence[Scenario],
    setup: Setup,
    options: Options,
    fused: tuple[LinearCrossEntropy | None, str],
    report: Callable[[Cell], None],
    profile_sink: Callable[[str], None] | None = None,
    budgets: dict[str, float] | None = None,
    liger: bool = True,
) -> dict[str, Any]:
    """Wrap the model for one stack, measure it on every scenario, and unwrap it again.

    Args:
        stack: a name from ``STACKS``.
        model: the base model (unwrapped); it is unwrapped again on return.
        scenarios: the workloads.
        setup: the run's setup.
        options: step counts and the time cap.
        fused: the linear cross-entropy of ``hf_best`` and ``osstune`` and its label (see
            ``linear_cross_entropy``).
        report: called with each finished cell.
        profile_sink: see ``measure``; used for the plain ``osstune`` stack only.
        budgets: per scenario, the peak bytes ``--gradient_checkpointing auto`` may plan for (osstune stacks);
            free device memory where a scenario has none.
        liger: ``hf_best`` and ``osstune`` run liger's RMSNorm and RoPE on CUDA (``liger_layer_kernels``).

    Returns:
        The stack's description: its pieces, trainable parameters and, for osstune, its LoRA summary.
    """
    linear_ce, loss_label = (None, "HF loss") if stack == "seed" else fused
    budgets = budgets or {}
    base_stack, _, variant = stack.partition("[")
    if base_stack == "osstune" and linear_ce is not None:
        linear_ce, loss_label = osstune_linear_cross_entropy, "osstune fused linear CE"
    options_on = set(variant.rstrip("]").split("+")) - {""}
    parked = park_dense_experts(model) if base_stack == "osstune" and "bf16" not in options_on else []
    undo_liger, liger_label = (None, "") if stack == "seed" or setup.device.type != "cuda" or not liger else (
        liger_layer_kernels(model))
    try:
        peft_model, pieces = wrap(base_stack, model, setup, loss_label)
    except Exception as exc:  # noqa: BLE001 - the other stacks still run; the traceback goes to stderr
        traceback.print_exc()
        status = f"error: wrapping failed: {exc.__class__.__name__}"
        for scenario in scenarios:
            report(Cell(stack, scenario.name, status, scenario.tokens, 0, notes=str(exc).replace("|", "/")[:200]))
        restore_dense_experts(model, parked)
        if undo_liger is not None:
            undo_liger()
        return {"pieces": status, "trainable_params": 0}
    if liger_label:
        pieces += f"; {liger_label}"
    if parked:
        pieces += "; experts MXFP4-resident"
    if "nockpt" in options_on:
        model.activation_checkpointing_disable()
        pieces += "; no checkpointing"
    elif base_stack != "osstune" or "ckptall" in options_on:
        pieces += "; checkpointing every layer"
    else:
        pieces += "; --gradient_checkpointing auto"
    compiled = compile_layers(model, options_on)
    if compiled:
        pieces += f"; {compiled}"
    trainable = sum(param.numel() for param in peft_model.parameters() if param.requires_grad)
    info: dict[str, Any] = {"pieces": pieces, "trainable_params": trainable}
    handles = []
    if base_stack == "osstune":
        info["lora"] = trainable_summary(peft_model)
        handles = install_attention_masks(peft_model)
    sink = profile_sink if stack == "osstune" else None
    auto = base_stack == "osstune" and not options_on & {"ckptall", "nockpt"} and setup.device.type == "cuda"
    try:
        for scenario in scenarios:
            notes = pieces
            if auto:
                plan = auto_checkpointing(peft_model, scenario, budgets.get(scenario.name), undo_liger is not None)
                notes += f" ({plan})"
            report(measure(peft_model, stack, scenario, base_stack == "osstune", linear_ce, notes, setup, options,
                           sink))
    finally:
        if auto or "nockpt" in options_on:
            model.activation_checkpointing_enable()
        restore_dense_experts(model, parked)
        if undo_liger is not None:
            undo_liger()
        for module in model.modules():
            if _is_compiled(module):
                del module.forward
        for handle in handles:
            handle.remove()
        peft_model.unload()
        del peft_model
        _free(model, setup.device)
    return info


def _number(value: float | None, digits: int) -> str:
    """A table number with thousands separators, or ``-``."""
    return "-" if value is None else f"{value:,.{digits}f}"


def table(cells: Sequence[Cell]) -> str:
    """The markdown table of all cells.

    Args:
        cells: the measurements, in run order.
    """
    lines = ["| stack | scenario | tokens/s | step s | peak GiB | notes |", "|---|---|---:|---:|---:|---|"]
    for cell in cells:
        rate = _number(cell.tokens_per_s, 0) if cell.status == "ok" else cell.status
        lines.append(f"| {cell.stack} | {cell.scenario} | {rate} | {_number(cell.median_step_s, 3)} | "
                     f"{_number(cell.peak_gib, 1)} | {cell.notes} |")
    return "\n".join(lines)


def ratios(cells: Sequence[Cell], scenarios: Sequence[Scenario]) -> dict[str, float | None]:
    """osstune's tokens/s over hf_best's and over seed's, per scenario.

    Args:
        cells: the measurements.
        scenarios: the scenarios, in order.

    Returns:
        ``{"osstune/hf_best <scenario>": ratio or None}``, likewise for seed; None where a cell is missing,
        failed or ran out of memory.
    """
    rates = {(cell.stack, cell.scenario): cell.tokens_per_s for cell in cells if cell.status == "ok"}
    out: dict[str, float | None] = {}
    for scenario in scenarios:
        for other in ("hf_best", "seed"):
            ours, theirs = rates.get(("osstune", scenario.name)), rates.get((other, scenario.name))
            out[f"osstune/{other} {scenario.name}"] = ours / theirs if ours and theirs else None
    return out


def ratio_lines(cells: Sequence[Cell], scenarios: Sequence[Scenario]) -> list[str]:
    """``ratio osstune/<other> <scenario>: X.XX`` lines, with the reason where a ratio cannot be formed.

    Args:
        cells: the measurements.
        scenarios: the scenarios, in order.
    """
    status = {(cell.stack, cell.scenario): cell.status for cell in cells}
    lines = []
    for key, value in ratios(cells, scenarios).items():
        if value is not None:
            lines.append(f"ratio {key}: {value:.2f}")
            continue
        pair, scenario = key.split(" ")
        why = [f"{stack} {status.get((stack, scenario), 'not run')}" for stack in pair.split("/")
               if status.get((stack, scenario)) != "ok"]
        lines.append(f"ratio {key}: n/a ({', '.join(why)})")
    return lines


def environment(setup: Setup) -> dict[str, Any]:
    """Versions and the device, for the report.

    Args:
        setup: the run's setup.
    """
    import peft
    import transformers

    try:
        liger = version("liger-kernel")
    except PackageNotFoundError:
        liger = None
    device = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "liger_kernel": liger}


def save(record: Any, out_dir: str | None, name: str = "train_step.json") -> None:
    """Write the record as JSON to ``OUT/name`` when OUT is set.

    Args:
        record: everything measured so far (JSON-serialisable).
        out_dir: the OUT folder, or None to write nothing.
        name: the file's name.
    """
    if not out_dir:
        return
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _csv(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    """Comma-separated names, checked against ``allowed``.

    Args:
        text: the flag's value.
        allowed: the valid names.
        flag: the flag, for the error message.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"{flag} {text}: choose from {', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU, to check the harness in seconds")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, from {', '.join(STACKS)}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from fixed (4x2048), mix (real-length mix), long (1x16384), maxctx "
                             "(osstune's longest single sequence under --memory-cap-gib; not run by default)")
    parser.add_argument("--memory-cap-gib", "--memory_cap_gib", type=float, default=80.0,
                        help="maxctx: the allocator cap (torch.cuda.set_per_process_memory_fraction)")
    parser.add_argument("--context-lengths", default="65536,131072",
                        help="maxctx: sequence lengths to try, ascending, until one does not fit")
    parser.add_argument("--lean", default=None,
                        help="maxctx: osstune's memory options, +-joined from dN, acts, emb, opt (default: "
                             "memory.DEFAULT_LEAN)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
    parser.add_argument("--max-cell-s", type=float, default=45.0,
                        help="stop timing a cell once its timed steps took this many seconds (one step always runs)")
    parser.add_argument("--pad-batch", type=int, default=4, help="samples per padded micro-batch of the mix")
    parser.add_argument("--no-liger", action="store_true", help="hf_best and osstune use the HF loss, RMSNorm and RoPE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, token ids and lengths")
    parser.add_argument("--osstune-variants", default="",
                        help=f"extra osstune rows, comma-separated, from {', '.join(VARIANTS)} (nockpt: no "
                             "activation checkpointing)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="peak GiB osstune's --gradient_checkpointing auto plans for (default: hf_best's peak on "
                             "the same scenario in this run, else the free memory)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing each osstune cell, profile one more step and print where the GPU time "
                             "goes (CUDA only)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.pad_batch < 1:
        parser.error("--warmup must be >= 0, --steps and --pad-batch >= 1")
    return args


def describe_run(args: argparse.Namespace, setup: Setup, model: Any, build_s: float,
                 scenarios: Sequence[Scenario]) -> dict[str, Any]:
    """The run's record before any cell: environment, arguments, model, LoRA and scenarios.

    Args:
        args: the parsed command line.
        setup: the run's setup.
        model: the built model.
        build_s: seconds it took to build.
        scenarios: the workloads.
    """
    config = setup.config
    return {
        "environment": environment(setup),
        "args": vars(args),
        "model": {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "experts": config.num_local_experts,
                  "top_k": config.num_experts_per_tok, "vocab": config.vocab_size,
                  "dtype": str(setup.dtype).removeprefix("torch."),
                  "params": sum(param.numel() for param in model.parameters()), "build_s": build_s},
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "learning_rate": LEARNING_RATE},
        "scenarios": {scenario.name: {"tokens": scenario.tokens, "lengths": scenario.lengths,
                                      "padded": scenario.padded_detail, "packed": scenario.packed_detail}
                      for scenario in scenarios},
        "stacks": {},
        "cells": [],
    }


def header_lines(record: dict[str, Any], setup: Setup, options: Options, scenarios: Sequence[Scenario]) -> list[str]:
    """What the run measures, printed before the first cell.

    Args:
        record: the run's record (``describe_run``).
        setup: the run's setup.
        options: step counts and the time cap.
        scenarios: the workloads.
    """
    env, model = record["environment"], record["model"]
    lines = [
        f"# train step benchmark: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, liger-kernel {env['liger_kernel'] or 'absent'}",
        f"model: {model['params'] / 1e9:.2f}B params, built in {model['build_s']:.1f}s on {setup.device}; "
        f"LoRA r={LORA_RANK} alpha={LORA_ALPHA}; warmup {options.warmup}, timed steps {options.steps}",
    ]
    for scenario in scenarios:
        if len(scenario.lengths) > 1 and len(set(scenario.lengths)) > 1:
            lengths = scenario.lengths
            lines.append(f"{scenario.name}: {len(lengths)} samples, {scenario.tokens:,} tokens; lengths min "
                         f"{min(lengths)}, median {int(statistics.median(lengths))}, mean "
                         f"{statistics.mean(lengths):.0f}, max {max(lengths)}")
    return lines


def summary_lines(record: dict[str, Any], cells: Sequence[Cell], scenarios: Sequence[Scenario]) -> list[str]:
    """The final report: the table, each stack's pieces, the ratio lines and the total time.

    Args:
        record: the run's record, with its stacks and total time.
        cells: the measurements.
        scenarios: the workloads.
    """
    lines = ["", "tokens/s counts non-pad tokens; step s is the median timed step; peak GiB includes the weights.",
             table(cells), ""]
    for stack, info in record["stacks"].items():
        params = info.get("lora") or f"trainable params {info['trainable_params']:,}"
        lines.append(f"{stack}: {info['pieces']}; {params}")
    lines.append("")
    lines.extend(ratio_lines(cells, scenarios))
    for text in record.get("profiles", []):
        lines += ["", text]
    lines.append(f"total {record['total_s']:.0f}s")
    return lines


def run_max_context(args: argparse.Namespace, setup: Setup, record: dict[str, Any], out_dir: str | None) -> int | None:
    """The maxctx scenario: free the benchmark's bf16 model, then ``memory.max_context`` with the chosen cap, lengths
    and memory options; each try is printed and saved under ``record["max_context_cells"]``.

    Args:
        args: the command line.
        setup: the run's setup.
        record: the run's record (saved after each try).
        out_dir: the OUT folder, or None.

    Returns:
        The longest length that trained, or None.
    """
    import memory  # the sibling benchmark; imported here because it imports this module

    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    lean = memory.Lean.parse(args.lean or memory.DEFAULT_LEAN)
    lengths = [256, 512] if args.tiny else [int(item) for item in args.context_lengths.split(",")]
    record["max_context_cells"] = []

    def done(cell: Any) -> None:
        record["max_context_cells"].append(asdict(cell))
        peak = f"{cell.peak_gib:.2f}" if cell.peak_gib is not None else "-"
        print(f"  maxctx {cell.name}: {cell.status}, peak {peak} GiB, step {_number(cell.step_s, 1)}s, "
              f"{_number(cell.tokens_per_s, 0)} tokens/s", file=sys.stderr, flush=True)
        save(record, out_dir)

    return memory.max_context(setup, lengths, args.memory_cap_gib, lean, args.seed, done)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the model once, measure the chosen stacks on the chosen scenarios, print and save the results.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every cell ran or ran out of memory, 1 when a cell failed otherwise.
    """
    args = parse_args(argv)
    stacks = [name for name in STACKS if name in _csv(args.stacks, STACKS, "--stacks")]
    for variant in filter(None, (name.strip() for name in args.osstune_variants.split(","))):
        _csv(variant.replace("+", ","), VARIANTS, "--osstune-variants")
        stacks.append(f"osstune[{variant}]")
    kinds = _csv(args.scenarios, (*SCENARIOS, MAX_CONTEXT), "--scenarios")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # One process compiles flex_attention and its block masks for many shapes and mask kinds; past dynamo's default
    # of 8 recompiles, later cells would silently fall back to uncompiled attention.
    torch._dynamo.config.recompile_limit = 64
    if args.tiny:
        # Tiny tensors gain nothing from intra-op threads, and on a busy CI machine the threads only contend.
        torch.set_num_threads(1)
    started = time.perf_counter()
    setup = make_setup(args.tiny, args.pad_batch)
    options = Options(args.warmup, args.steps, args.max_cell_s)
    torch.manual_seed(args.seed)
    model = build_model(setup)
    scenarios = make_scenarios(setup, kinds, args.seed)
    record = describe_run(args, setup, model, time.perf_counter() - started, scenarios)
    print("\n".join(header_lines(record, setup, options, scenarios)), flush=True)
    out_dir = os.environ.get("OUT")
    cells: list[Cell] = []

    def report(cell: Cell) -> None:
        cells.append(cell)
        record["cells"].append({**asdict(cell), "median_step_s": cell.median_step_s,
                                "tokens_per_s": cell.tokens_per_s})
        print(f"  {cell.stack:8s} {cell.scenario:8s} {cell.status:4s} tokens/s {_number(cell.tokens_per_s, 0)} "
              f"step {_number(cell.median_step_s, 3)}s peak {_number(cell.peak_gib, 1)} GiB "
              f"loss {_number(cell.first_loss, 4)} -> {_number(cell.loss, 4)}", file=sys.stderr, flush=True)
        save(record, out_dir)

    profiles: list[str] = []

    def keep_profile(text: str) -> None:
        profiles.append(text)
        record["profiles"] = profiles
        print(text, file=sys.stderr, flush=True)
        save(record, out_dir)

    fused = linear_cross_entropy(args.tiny, not args.no_liger)
    for stack in stacks:
        budgets = {cell.scenario: cell.peak_gib * 2**30 for cell in cells
                   if cell.stack == "hf_best" and cell.peak_gib is not None and args.memory_budget_gib is None}
        if args.memory_budget_gib is not None:
            budgets = {scenario.name: args.memory_budget_gib * 2**30 for scenario in scenarios}
        record["stacks"][stack] = run_stack(stack, model, scenarios, setup, options, fused, report,
                                            keep_profile if args.profile else None, budgets, not args.no_liger)
    record["ratios"] = ratios(cells, scenarios)
    if MAX_CONTEXT in kinds:
        del model
        record["max_context"] = run_max_context(args, setup, record, out_dir)
    record["total_s"] = time.perf_counter() - started
    save(record, out_dir)
    print("\n".join(summary_lines(record, cells, scenarios)))
    return 1 if any(cell.status.startswith("error") for cell in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
