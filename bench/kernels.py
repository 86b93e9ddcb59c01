"""Micro-benchmark of osstune's Triton kernels against the PyTorch code they replace, at gpt-oss-20b sizes.

- SwiGLU, forward + backward, on S = 8192 * 4 (token, expert) pairs of F = 5760 gate/up columns in bf16:
  transformers' ``GptOssExperts._apply_gate`` with autograd, ``clamp_swiglu`` on its PyTorch path, and
  ``clamp_swiglu`` on its Triton kernels. Also reported: the memory held between forward and backward
  (what autograd saves plus the output).
- MXFP4 dequantisation of one layer's expert stacks to bf16: gate_up (32 x 2880 x 5760) and down
  (32 x 2880 x 2880), with the PyTorch reference ``dequantize_mxfp4`` and with ``dequantize_mxfp4_triton``, beside
  a plain copy of as many bytes (the bandwidth bound); then the layout training reads (``transposed=False``) under
  each block size of the flat kernel (whole stacks) and each launch tile of the strided kernel (slices).
- The elementwise passes of the grouped expert forward, forward + backward, at T = 8192 tokens routed top-4
  (S = 32768 rows), F = 5760, H = 2880 in bf16, the unfused PyTorch operations against the fused passes of
  ``osstune.kernels.moe``: gate = add the gathered gate/up bias and the LoRA product to the base projection, then
  ``clamp_swiglu``, against ``gate_activation`` (both overwrite a fresh copy of the base projection, whose cost is
  included and also reported alone); combine = add the gathered down bias, weight by the routing weights, scatter
  into a zero-filled ``[T * K, H]`` tensor and sum over K in float32, against ``combine_experts``.

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes a fused kernel must move (SwiGLU:
read gate_up and write the activation forward, read gate_up and the upstream gradient and write the input
gradient backward; dequantisation: read blocks and scales, write the dense tensor; gate: copy the base, read base
and LoRA and write the pre-activation and the activation forward, read the pre-activation and the upstream
gradient and write its gradient backward; combine: read the rows and write the sums forward, read the gathered
upstream gradient and the rows and write the rows' gradient backward), for every row alike, so the figures compare
as throughput. Needs one CUDA GPU; runs in well under 30 s on an H100/H200:

    PYTHONPATH=src python3 bench/kernels.py

With OUT set, the numbers are also written to ``$OUT/kernels.json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

PAIRS = 8192 * 4
"""(token, expert) pairs of a 8192-token batch routed top-4."""

GATE_UP_WIDTH = 5760
"""gate/up columns F of gpt-oss-20b (2 x intermediate 2880)."""

EXPERTS, HIDDEN, INTERMEDIATE = 32, 2880, 2880
"""gpt-oss-20b's experts per layer, hidden size, intermediate size."""

ALPHA, LIMIT = 1.702, 7.0
"""gpt-oss's SwiGLU constants."""

TOKENS, TOP_K = 8192, 4
"""Tokens of the batch and experts per token (``PAIRS = TOKENS * TOP_K``)."""


def median_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in milliseconds (``triton.testing.do_bench``, 100 ms of repetitions).

    Args:
        fn: the work to time; it must synchronise nothing itself.
        grad_to_none: tensors whose ``.grad`` is reset before each call.
    """
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def bench_swiglu() -> list[dict[str, object]]:
    """Time the three SwiGLU implementations, forward + backward, and measure what they hold for backward.

    Returns:
        One row per implementation: name, ms, GB/s, MiB held between forward and backward.
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from osstune.kernels.swiglu import clamp_swiglu

    constants = SimpleNamespace(alpha=ALPHA, limit=LIMIT)
    x = torch.randn(PAIRS, GATE_UP_WIDTH, device="cuda", dtype=torch.bfloat16).mul_(4).requires_grad_(True)
    grad_out = torch.randn(PAIRS, GATE_UP_WIDTH // 2, device="cuda", dtype=torch.bfloat16)
    element = x.element_size()
    moved = PAIRS * element * (3 * GATE_UP_WIDTH + 2 * (GATE_UP_WIDTH // 2))
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "swiglu _apply_gate (autograd)": lambda t: GptOssExperts._apply_gate(constants, t),
        "swiglu clamp_swiglu torch path": lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT, use_triton=False),
        "swiglu clamp_swiglu triton": lambda t: clamp_swiglu(t, alpha=ALPHA, limit=LIMIT, use_triton=True),
    }
    rows = []
    for name, fn in variants.items():
        fn(x).backward(grad_out)  # compile / warm up
        x.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = fn(x)
        held = torch.cuda.memory_allocated() - before
        out.backward(grad_out)
        del out
        x.grad = None
        ms = median_ms(lambda fn=fn: fn(x).backward(grad_out), grad_to_none=[x])
        rows.append({"name": name, "ms": ms, "gb_per_s": moved / ms / 1e6, "held_mib": held / 2**20})
    return rows


def layer_stacks(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """One gpt-oss-20b layer's two MXFP4 expert stacks on CUDA, random codes at typical scale bytes, in the
    checkpoint's layout (rows = output dimension, 16 bytes per scale group of 32 input columns).

    Args:
        seed: seed of the codes and scales.

    Returns:
        ``(name, blocks, scales, moved)`` for gate_up and down; ``moved`` is the bytes a dequantisation to bf16
        reads and writes (blocks and scales, two bf16 values per code byte).
    """
    generator = torch.Generator(device="cuda").manual_seed(seed)
    stacks = []
    for name, out_rows, groups in (("gate_up", 2 * INTERMEDIATE, HIDDEN // 32), ("down", HIDDEN, INTERMEDIATE // 32)):
        blocks = torch.randint(0, 256, (EXPERTS, out_rows, groups, 16), device="cuda", dtype=torch.uint8,
                               generator=generator)
        scales = torch.randint(110, 135, (EXPERTS, out_rows, groups), device="cuda", dtype=torch.uint8,
                               generator=generator)
        stacks.append((name, blocks, scales, blocks.numel() + scales.numel() + blocks.numel() * 2 * 2))
    return stacks


def bench_dequantize() -> list[dict[str, object]]:
    """Time the PyTorch reference and the Triton kernel on one layer's two expert stacks (bf16 output), beside a
    plain copy that reads and writes as many bytes as the kernel moves (what the memory system allows).

    Returns:
        One row per (implementation, stack): name, ms, GB/s.
    """
    from osstune.kernels.mxfp4 import dequantize_mxfp4_triton
    from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4

    rows = []
    for name, blocks, scales, moved in layer_stacks(seed=0):
        experts, out_rows, groups, _ = blocks.shape
        stack = f"{name} {experts}x{groups * 32}x{out_rows}"
        scratch = torch.empty(experts, groups * 32, out_rows, device="cuda", dtype=torch.bfloat16)
        dequantize_mxfp4_triton(blocks, scales, torch.bfloat16, out=scratch)  # compile
        if not torch.equal(scratch, dequantize_mxfp4(blocks, scales, torch.bfloat16)):
            raise SystemExit(f"the Triton kernel disagrees with dequantize_mxfp4 on {stack}")
        source = torch.empty(moved // 4, device="cuda", dtype=torch.bfloat16)  # read + written = the kernel's bytes
        target = torch.empty_like(source)
        for name, fn in (
            ("copy of as many bytes (bandwidth bound)", lambda: target.copy_(source)),
            ("dequantize_mxfp4 (torch)", lambda: dequantize_mxfp4(blocks, scales, torch.bfloat16)),
            ("dequantize_mxfp4_triton", lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16)),
            ("dequantize_mxfp4_triton out=", lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16,
                                                                             out=scratch)),
        ):
            ms = median_ms(fn)
            rows.append({"name": f"{name} {stack}", "ms": ms, "gb_per_s": moved / ms / 1e6})
    return rows


SWEEP_TILES: tuple[tuple[int, int, int], ...] = (
    (128, 64, 4), (64, 128, 4), (32, 256, 4), (16, 512, 4), (64, 64, 4), (128, 128, 8),
)
"""(rows, cols, warps) launch tiles of the strided kernel ``sweep_dequantize`` times."""

SWEEP_FLAT_BLOCKS: tuple[int, ...] = (1024, 2048, 4096, 8192)
"""Code bytes per program of the flat kernel ``sweep_dequantize`` times."""


def sweep_dequantize() -> list[dict[str, object]]:
    """Time ``dequantize_mxfp4_triton`` in the layout training uses (``transposed=False``: the checkpoint's
    ``[E, O, I]`` order): the flat kernel of whole stacks under each block of ``SWEEP_FLAT_BLOCKS``, and the strided
    kernel of slices (here the same stack, expert-minor) under each tile of ``SWEEP_TILES``, checking each against
    the reference bit for bit.

    Returns:
        One row per (stack, kernel, launch shape): name, ms, GB/s; the shapes in use are marked.
    """
    from osstune.kernels import mxfp4
    from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4

    current_tile, current_block = mxfp4.TILES[False], mxfp4.FLAT_BLOCK
    rows = []
    try:
        for name, blocks, scales, moved in layer_stacks(seed=1):
            experts, out_rows, groups, _ = blocks.shape
            stack = f"{name} {experts}x{out_rows}x{groups * 32}"
            expected = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2)
            scratch = torch.empty(experts, out_rows, groups * 32, device="cuda", dtype=torch.bfloat16)
            expert_minor = (blocks.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
                            scales.permute(1, 0, 2).contiguous().permute(1, 0, 2))
            shapes = [("flat", block, (blocks, scales)) for block in SWEEP_FLAT_BLOCKS]
            shapes += [("strided", mxfp4.Tile(*tile), expert_minor) for tile in SWEEP_TILES]
            for kernel, shape, (stack_blocks, stack_scales) in shapes:
                if kernel == "flat":
                    mxfp4.FLAT_BLOCK = shape
                else:
                    mxfp4.TILES[False] = shape

                def run(b: torch.Tensor = stack_blocks, s: torch.Tensor = stack_scales) -> torch.Tensor:
                    return mxfp4.dequantize_mxfp4_triton(b, s, torch.bfloat16, out=scratch, transposed=False)

                scratch.fill_(float("nan"))
                run()
                if not torch.equal(scratch, expected):
                    raise SystemExit(f"{kernel} {shape} disagrees with dequantize_mxfp4 on {stack}")
                ms = median_ms(run)
                mark = " (current)" if shape in (current_tile, current_block) else ""
                rows.append({"name": f"{stack} {kernel} {shape}{mark}", "ms": ms, "gb_per_s": moved / ms / 1e6})
    finally:
        mxfp4.TILES[False], mxfp4.FLAT_BLOCK = current_tile, current_block
    return rows


def bench_moe() -> list[dict[str, object]]:
    """Time the unfused PyTorch operations and the fused passes of the expert forward, forward + backward.

    Returns:
        Rows (name, ms, GB/s): the copy of the base projection alone, gate unfused, gate fused, combine unfused,
        combine fused.
    """
    from osstune.kernels.moe import combine_experts, gate_activation
    from osstune.kernels.swiglu import clamp_swiglu
    from osstune.models.gpt_oss.experts import route_by_expert

    generator = torch.Generator(device="cuda").manual_seed(0)
    bf16: dict[str, object] = {"device": "cuda", "dtype": torch.bfloat16}
    scores = torch.rand(TOKENS, EXPERTS, device="cuda", generator=generator)
    routing = route_by_expert(scores.topk(TOP_K, dim=-1).indices, EXPERTS)
    base = torch.randn(PAIRS, GATE_UP_WIDTH, generator=generator, **bf16).mul_(4)
    lora = torch.randn(PAIRS, GATE_UP_WIDTH, generator=generator, **bf16).requires_grad_(True)
    gate_bias = torch.randn(EXPERTS, GATE_UP_WIDTH, generator=generator, **bf16)
    grad_act = torch.randn(PAIRS, GATE_UP_WIDTH // 2, generator=generator, **bf16)
    down = torch.randn(PAIRS, HIDDEN, generator=generator, **bf16).requires_grad_(True)
    down_bias = torch.randn(EXPERTS, HIDDEN, generator=generator, **bf16)
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, device="cuda", generator=generator), dim=-1)
    weights = weights.to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(TOKENS, HIDDEN, generator=generator, **bf16)

    def gate_unfused() -> torch.Tensor:
        pre = base.clone()
        pre.add_(gate_bias.index_select(0, routing.expert_S))
        pre.add_(lora)
        return clamp_swiglu(pre, alpha=ALPHA, limit=LIMIT)

    def gate_fused() -> torch.Tensor:
        return gate_activation(base.clone(), lora, gate_bias, routing.expert_S, alpha=ALPHA, limit=LIMIT)

    def combine_unfused() -> torch.Tensor:
        rows = down + down_bias.index_select(0, routing.expert_S)
        weighted = rows * weights.reshape(-1).index_select(0, routing.pair_S)[:, None]
        pairs = torch.zeros_like(weighted).index_copy(0, routing.pair_S, weighted)
        return pairs.view(TOKENS, TOP_K, HIDDEN).sum(dim=1, dtype=torch.float32).to(torch.bfloat16)

    def combine_fused() -> torch.Tensor:
        return combine_experts(down, down_bias, routing.expert_S, routing.pair_S, weights, TOKENS, TOP_K)

    for unfused, fused in ((gate_unfused, gate_fused), (combine_unfused, combine_fused)):
        expected, got = unfused().float(), fused().float()
        if ((got - expected).norm() / expected.norm()).item() > 1e-2:
            raise SystemExit(f"{fused.__name__} disagrees with {unfused.__name__}")
    element = 2  # bytes per bf16 value
    gate_moved = PAIRS * GATE_UP_WIDTH * element * 8  # copy 2, forward 3.5, backward 2.5 (in units of [S, F])
    combine_moved = (4 * PAIRS + TOKENS) * HIDDEN * element
    variants: list[tuple[str, Callable[[], object], list[torch.Tensor], int]] = [
        ("copy of the base projection", base.clone, [], 2 * PAIRS * GATE_UP_WIDTH * element),
        ("gate unfused (adds + clamp_swiglu)", lambda: gate_unfused().backward(grad_act), [lora], gate_moved),
        ("gate fused (gate_activation)", lambda: gate_fused().backward(grad_act), [lora], gate_moved),
        ("combine unfused (weight, scatter, sum)", lambda: combine_unfused().backward(grad_out), [down, weights],
         combine_moved),
        ("combine fused (combine_experts)", lambda: combine_fused().backward(grad_out), [down, weights],
         combine_moved),
    ]
    rows = []
    for name, fn, grads, moved in variants:
        fn()  # compile / warm up
        ms = median_ms(fn, grad_to_none=grads)
        rows.append({"name": name, "ms": ms, "gb_per_s": moved / ms / 1e6})
    return rows


def main() -> int:
    """Run the benchmarks, print their tables, write ``$OUT/kernels.json`` when OUT is set.

    Returns:
        The exit status: 0, or 1 without a CUDA device.
    """
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 1
    swiglu_rows = bench_swiglu()
    dequantize_rows = bench_dequantize()
    moe_rows = bench_moe()
    sweep_rows = sweep_dequantize()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"SwiGLU fwd+bwd, S={PAIRS} x F={GATE_UP_WIDTH} bf16")
    print(f"| {'implementation':<34} | {'ms':>8} | {'GB/s':>7} | {'held MiB':>8} |")
    for row in swiglu_rows:
        print(f"| {row['name']:<34} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} | {row['held_mib']:8.0f} |")
    print("MXFP4 -> bf16, one gpt-oss-20b layer")
    print(f"| {'implementation':<55} | {'ms':>8} | {'GB/s':>7} |")
    for row in dequantize_rows:
        print(f"| {row['name']:<55} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} |")
    print("MXFP4 -> bf16 in the training layout ([E, O, I]), by kernel and launch shape")
    print(f"| {'stack, kernel, launch shape':<60} | {'ms':>8} | {'GB/s':>7} |")
    for row in sweep_rows:
        print(f"| {row['name']:<60} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} |")
    print(f"Expert elementwise passes fwd+bwd, S={PAIRS} F={GATE_UP_WIDTH} H={HIDDEN} T={TOKENS} K={TOP_K} bf16")
    print(f"| {'implementation':<42} | {'ms':>8} | {'GB/s':>7} |")
    for row in moe_rows:
        print(f"| {row['name']:<42} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} |")
    print(f"speedup swiglu fwd+bwd, triton over _apply_gate: {swiglu_rows[0]['ms'] / swiglu_rows[2]['ms']:.2f}x")
    for start in range(0, len(dequantize_rows), 4):
        reference, kernel = dequantize_rows[start + 1], dequantize_rows[start + 2]
        print(f"speedup {kernel['name']} over torch: {reference['ms'] / kernel['ms']:.2f}x")
    for start in (1, 3):
        unfused, fused = moe_rows[start], moe_rows[start + 1]
        print(f"speedup {fused['name']} over {unfused['name']}: {unfused['ms'] / fused['ms']:.2f}x")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "swiglu": swiglu_rows, "dequantize": dequantize_rows, "moe": moe_rows,
                                    "dequantize_tiles": sweep_rows},
                                   indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
