"""Micro-benchmark of osstune's Triton kernels against the PyTorch code they replace, at gpt-oss-20b sizes.

- SwiGLU, forward + backward, on S = 8192 * 4 (token, expert) pairs of F = 5760 gate/up columns in bf16:
  transformers' ``GptOssExperts._apply_gate`` with autograd, ``clamp_swiglu`` on its PyTorch path, and
  ``clamp_swiglu`` on its Triton kernels. Also reported: the memory held between forward and backward
  (what autograd saves plus the output).
- MXFP4 dequantisation of one layer's expert stacks to bf16: gate_up (32 x 2880 x 5760) and down
  (32 x 2880 x 2880), with the PyTorch reference ``dequantize_mxfp4`` and with ``dequantize_mxfp4_triton``.

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes a fused kernel must move (SwiGLU:
read gate_up and write the activation forward, read gate_up and the upstream gradient and write the input
gradient backward; dequantisation: read blocks and scales, write the dense tensor), for every row alike, so the
figures compare as throughput. Needs one CUDA GPU; runs in well under 30 s on an H100/H200:

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


def bench_dequantize() -> list[dict[str, object]]:
    """Time the PyTorch reference and the Triton kernel on one layer's two expert stacks (bf16 output).

    Returns:
        One row per (implementation, stack): name, ms, GB/s.
    """
    from osstune.kernels.mxfp4 import dequantize_mxfp4_triton
    from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4

    generator = torch.Generator(device="cuda").manual_seed(0)
    stacks = {  # checkpoint layout: rows = output dimension, cols / 32 groups of 16 bytes
        f"gate_up {EXPERTS}x{HIDDEN}x{2 * INTERMEDIATE}": (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32),
        f"down {EXPERTS}x{INTERMEDIATE}x{HIDDEN}": (EXPERTS, HIDDEN, INTERMEDIATE // 32),
    }
    rows = []
    for stack, (experts, out_rows, groups) in stacks.items():
        blocks = torch.randint(0, 256, (experts, out_rows, groups, 16), device="cuda", dtype=torch.uint8,
                               generator=generator)
        scales = torch.randint(110, 135, (experts, out_rows, groups), device="cuda", dtype=torch.uint8,
                               generator=generator)
        moved = blocks.numel() + scales.numel() + blocks.numel() * 2 * 2  # two bf16 values per code byte
        scratch = torch.empty(experts, groups * 32, out_rows, device="cuda", dtype=torch.bfloat16)
        dequantize_mxfp4_triton(blocks, scales, torch.bfloat16, out=scratch)  # compile
        if not torch.equal(scratch, dequantize_mxfp4(blocks, scales, torch.bfloat16)):
            raise SystemExit(f"the Triton kernel disagrees with dequantize_mxfp4 on {stack}")
        for name, fn in (
            ("dequantize_mxfp4 (torch)", lambda: dequantize_mxfp4(blocks, scales, torch.bfloat16)),
            ("dequantize_mxfp4_triton", lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16)),
            ("dequantize_mxfp4_triton out=", lambda: dequantize_mxfp4_triton(blocks, scales, torch.bfloat16,
                                                                             out=scratch)),
        ):
            ms = median_ms(fn)
            rows.append({"name": f"{name} {stack}", "ms": ms, "gb_per_s": moved / ms / 1e6})
    return rows


def main() -> int:
    """Run both benchmarks, print a table, write ``$OUT/kernels.json`` when OUT is set.

    Returns:
        The exit status: 0, or 1 without a CUDA device.
    """
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 1
    swiglu_rows = bench_swiglu()
    dequantize_rows = bench_dequantize()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"SwiGLU fwd+bwd, S={PAIRS} x F={GATE_UP_WIDTH} bf16")
    print(f"| {'implementation':<34} | {'ms':>8} | {'GB/s':>7} | {'held MiB':>8} |")
    for row in swiglu_rows:
        print(f"| {row['name']:<34} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} | {row['held_mib']:8.0f} |")
    print("MXFP4 -> bf16, one gpt-oss-20b layer")
    print(f"| {'implementation':<55} | {'ms':>8} | {'GB/s':>7} |")
    for row in dequantize_rows:
        print(f"| {row['name']:<55} | {row['ms']:8.3f} | {row['gb_per_s']:7.0f} |")
    print(f"speedup swiglu fwd+bwd, triton over _apply_gate: {swiglu_rows[0]['ms'] / swiglu_rows[2]['ms']:.2f}x")
    for start in range(0, len(dequantize_rows), 3):
        reference, kernel = dequantize_rows[start], dequantize_rows[start + 1]
        print(f"speedup {kernel['name']} over torch: {reference['ms'] / kernel['ms']:.2f}x")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "swiglu": swiglu_rows, "dequantize": dequantize_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
