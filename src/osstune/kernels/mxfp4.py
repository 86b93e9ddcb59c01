"""MXFP4 dequantisation of gpt-oss expert stacks in one Triton kernel launch.

The specification is ``osstune.models.gpt_oss.mxfp4.dequantize_mxfp4``: element ``(e, r, c)`` of the checkpoint is
``E2M1_VALUES[code] * 2**(scale - 127)``, rounded once to float32 (exact except for overflow to ``±inf``: every
non-zero product has at most two significant bits and is at least ``2**-128``, inside float32's subnormal range),
then cast to the output dtype, and it lands transposed at ``out[e, c, r]``. The kernels form that float32 value with
two float32 multiplications that never round (``_e2m1_bits``; Triton keeps subnormals, no flush-to-zero), keep
bfloat16 as the upper half of its bit pattern (exact: the low 16 bits are zero) and convert to float16 with
round-to-nearest-even, so their output is bit-identical to the reference for every code byte and scale byte. (An
all-integer construction of the bit pattern is as exact but took twice as long: the decode, not memory traffic,
bounded it.)

Scale byte 255 scales by ``2**128``: ``±0.5`` becomes ``±2**127``, larger codes ``±inf``, zero codes stay signed
zeros. The reference computes exactly that wherever ``torch.ldexp`` has its exact integer-exponent kernel (torch
2.13 does); builds whose ``ldexp`` multiplies by ``pow(2, exponent)`` give ``±inf`` for ``±0.5`` and NaN for zero
codes at scale byte 255, and agree everywhere else.

A whole stack in the checkpoint's order (``transposed=False``, what the grouped expert matmuls read) is one flat
pass: output element ``i`` is nibble ``i % 2`` of code byte ``i // 2`` and takes scale byte ``i // 32``. Slices of a
stack and the transposed order take the strided kernel: each program decodes a tile (``TILES``) of checkpoint rows
x columns of one expert, reads the packed bytes row-major (16 per scale group) and each scale byte once, and writes
the tile (transposed or not) so that the stores run along the output's contiguous dimension. Its grid spans row
tiles x column tiles x experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from osstune.models.gpt_oss.mxfp4 import BLOCK_SIZE


class Tile(NamedTuple):
    """One program's share of the work and its warps.

    Args:
        rows: checkpoint rows per program.
        cols: checkpoint columns per program (a power of two, at least one scale group of 32): ``cols / 2`` packed
            bytes of each row.
        warps: warps per program.
    """

    rows: int
    cols: int
    warps: int


TILES: dict[bool, Tile] = {True: Tile(128, 64, 4), False: Tile(16, 512, 4)}
"""The launch tile for each output layout (``transposed`` True / False) of the strided kernel (slices of a stack;
whole stacks in the checkpoint's order take the flat kernel); ``bench/kernels.py`` times the alternatives
(``sweep_dequantize``)."""

OUTPUT_KINDS: dict[torch.dtype, tuple[int, torch.dtype]] = {
    torch.float32: (0, torch.int32),
    torch.bfloat16: (1, torch.int16),
    torch.float16: (2, torch.int16),
}
"""Output dtype -> (kernel's ``OUT_KIND``, integer dtype of the same width the kernel stores bit patterns through)."""


@triton.jit
def _e2m1_bits(code, scale, OUT_KIND: tl.constexpr):
    """Bit pattern (in the output dtype's width, as int32) of ``E2M1[code] * 2**(scale - 127)`` for int32 tensors.

    Two exact float32 multiplications: the code's magnitude (built from its bits) times ``2**clamp(scale - 127,
    -126, 127)``, a normal float32, then times the rest, ``2**-1``, ``1`` or ``2**1``. Every product has at most two
    significant bits and is 0, at least ``2**-128`` or overflows to ``inf`` (scale byte 255, codes above 0.5), so
    neither multiplication rounds; the sign bit is set last (zero codes give signed zeros).
    """
    magnitude = code & 7
    # E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 as float32 bit patterns: 1.m * 2**(e - 1) for e = magnitude >> 1.
    value = tl.where(magnitude >= 2, ((126 + (magnitude >> 1)) << 23) | ((magnitude & 1) << 22),
                     tl.where(magnitude == 1, 126 << 23, 0))
    exponent = tl.minimum(tl.maximum(scale, 1), 254)  # biased exponent of the normal factor
    value = value.to(tl.float32, bitcast=True) * (exponent << 23).to(tl.float32, bitcast=True)
    value = value * ((127 + scale - exponent) << 23).to(tl.float32, bitcast=True)
    bits = value.to(tl.int32, bitcast=True) | ((code >> 3) << 31)
    if OUT_KIND == 1:
        bits = bits >> 16
    elif OUT_KIND == 2:
        half = bits.to(tl.float32, bitcast=True).to(tl.float16, fp_downcast_rounding="rtne")
        bits = half.to(tl.int16, bitcast=True).to(tl.int32)
    return bits


@triton.jit
def _dequantize_mxfp4_kernel(
    blocks_ptr, scales_ptr, out_ptr, rows, cols, blocks_expert_stride, blocks_row_stride, scales_expert_stride,
    scales_row_stride,
    OUT_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Decode one ``[BLOCK_R, BLOCK_C]`` tile of expert ``program_id(2)`` and store it, transposed or not.

    The tile is held as ``[rows, scale groups, 16 bytes]`` so that each scale is loaded once and broadcast.
    """
    GROUPS_PER_TILE: tl.constexpr = BLOCK_C // 32
    expert = tl.program_id(2).to(tl.int64)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1) * GROUPS_PER_TILE + tl.arange(0, GROUPS_PER_TILE)
    lane = tl.arange(0, 16)
    groups = cols // 32
    mask = (row < rows)[:, None] & (group < groups)[None, :]
    scale = tl.load(scales_ptr + expert * scales_expert_stride + row[:, None] * scales_row_stride + group[None, :],
                    mask=mask, other=0).to(tl.int32)[:, :, None]
    packed = tl.load(
        blocks_ptr + expert * blocks_expert_stride + (row[:, None] * blocks_row_stride + group[None, :] * 16)[:, :, None]
        + lane[None, None, :],
        mask=mask[:, :, None], other=0,
    ).to(tl.int32)
    even = _e2m1_bits(packed & 15, scale, OUT_KIND)  # [rows, groups, lanes]
    odd = _e2m1_bits(packed >> 4, scale, OUT_KIND)
    out_ty = out_ptr.dtype.element_ty
    if TRANSPOSED:
        column = group[:, None] * 32 + 2 * lane[None, :]  # even column of each byte
        out_offsets = expert * cols * rows + column[:, :, None] * rows + row[None, None, :]
        out_mask = tl.permute(mask[:, :, None], (1, 2, 0))
        tl.store(out_ptr + out_offsets, tl.permute(even, (1, 2, 0)).to(out_ty), mask=out_mask)
        tl.store(out_ptr + out_offsets + rows, tl.permute(odd, (1, 2, 0)).to(out_ty), mask=out_mask)
    else:
        values = tl.reshape(tl.join(even, odd), (BLOCK_R, BLOCK_C))  # low nibble first along each row
        column = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        out_offsets = expert * rows * cols + row[:, None] * cols + column[None, :]
        out_mask = (row < rows)[:, None] & (column < cols)[None, :]
        tl.store(out_ptr + out_offsets, values.to(out_ty), mask=out_mask)


@triton.jit
def _dequantize_mxfp4_flat_kernel(blocks_ptr, scales_ptr, out_ptr, num_bytes, OUT_KIND: tl.constexpr,
                                  BLOCK: tl.constexpr):
    """Decode ``BLOCK`` consecutive code bytes of a contiguous stack into the checkpoint's order: byte ``i`` holds
    output elements ``2i`` (low nibble) and ``2i + 1``, scaled by scale byte ``i // 16``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_bytes
    packed = tl.load(blocks_ptr + offsets, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + offsets // 16, mask=mask, other=0).to(tl.int32)
    values = tl.reshape(tl.join(_e2m1_bits(packed & 15, scale, OUT_KIND), _e2m1_bits(packed >> 4, scale, OUT_KIND)),
                        (2 * BLOCK,))  # low nibble first
    out_offsets = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=out_offsets < 2 * num_bytes)


FLAT_BLOCK = 4096
"""Code bytes per program of the contiguous checkpoint-order kernel (``bench/kernels.py`` times the tiles)."""


def dequantize_mxfp4_triton(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    transposed: bool = True,
) -> torch.Tensor:
    """Decode MXFP4 expert weights to a dense ``[E, in, out]`` tensor in one kernel launch.

    Bit-identical to ``osstune.models.gpt_oss.mxfp4.dequantize_mxfp4`` (see the module docstring), on CUDA (or
    on CPU tensors under Triton's interpreter). With ``transposed=False`` the same values land in the
    checkpoint's own ``[E, rows, cols]`` order (the transpose of the reference's result), which a matmul can read
    as the transposed operand without a copy.

    Args:
        blocks: uint8 ``[E, rows, cols / 32, 16]``, two E2M1 codes per byte (low nibble = even column). A slice
            of a larger stack along rows or scale groups (``blocks[:, r0:r1]``, ``blocks[:, :, g0:g1]``) is read in
            place; other layouts are copied first.
        scales: uint8 ``[E, rows, cols / 32]``, E8M0 block scales, on the device of ``blocks`` (sliced alike).
        dtype: float32, bfloat16 or float16.
        out: optional contiguous ``[E, cols, rows]`` (``[E, rows, cols]`` when not transposed) tensor of ``dtype``
            on the device of ``blocks`` to write into (a reusable scratch buffer); a new tensor is allocated when
            None.
        transposed: ``[E, cols, rows]`` as the reference (True) or ``[E, rows, cols]``.

    Returns:
        The dequantised weights (``out`` when given).

    Raises:
        ValueError: wrong dtypes or shapes, tensors on different devices, or an unusable ``out``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK_SIZE // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 blocks must be [E, rows, groups, {BLOCK_SIZE // 2}] and scales [E, rows, groups]; "
            f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    if blocks.device != scales.device:
        raise ValueError(f"MXFP4 blocks and scales must share a device, got {blocks.device} and {scales.device}")
    if dtype not in OUTPUT_KINDS:
        raise ValueError(f"the Triton MXFP4 kernel writes {tuple(OUTPUT_KINDS)}, not {dtype}")
    num_experts, rows, groups, _ = blocks.shape
    cols = groups * BLOCK_SIZE
    shape = (num_experts, cols, rows) if transposed else (num_experts, rows, cols)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != blocks.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {blocks.device}; got a "
            f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} tensor of shape {tuple(out.shape)} "
            f"on {out.device}"
        )
    if out.numel():
        kind, bits_dtype = OUTPUT_KINDS[dtype]
        tile = TILES[transposed]
        grid = (triton.cdiv(rows, tile.rows), triton.cdiv(cols, tile.cols), num_experts)
        if blocks.stride(3) != 1 or blocks.stride(2) != blocks.shape[3]:
            blocks = blocks.contiguous()
        if scales.stride(2) != 1:
            scales = scales.contiguous()
        if not transposed and blocks.is_contiguous() and scales.is_contiguous():
            # Output element i of the stack is nibble i % 2 of code byte i // 2: one flat pass.
            _dequantize_mxfp4_flat_kernel[(triton.cdiv(blocks.numel(), FLAT_BLOCK),)](
                blocks, scales, out.view(bits_dtype), blocks.numel(), OUT_KIND=kind, BLOCK=FLAT_BLOCK, num_warps=4,
            )
            return out
        _dequantize_mxfp4_kernel[grid](
            blocks, scales, out.view(bits_dtype), rows, cols, blocks.stride(0), blocks.stride(1), scales.stride(0),
            scales.stride(1),
            OUT_KIND=kind, BLOCK_R=tile.rows, BLOCK_C=tile.cols, TRANSPOSED=transposed, num_warps=tile.warps,
        )
    return out
