"""MXFP4 dequantisation of gpt-oss expert stacks in one Triton kernel launch.

The specification is ``osstune.models.gpt_oss.mxfp4.dequantize_mxfp4``: element ``(e, r, c)`` of the checkpoint is
``E2M1_VALUES[code] * 2**(scale - 127)``, rounded once to float32 (exact except for overflow to ``±inf``: every
non-zero product has at most two significant bits and is at least ``2**-128``, inside float32's subnormal range),
then cast to the output dtype, and it lands transposed at ``out[e, c, r]``. The kernel builds the float32 bit
pattern with integer arithmetic (no floating-point multiply, so no flush-to-zero or rounding-mode dependence), keeps
bfloat16 as the upper half of that pattern (exact: the low 16 bits are zero) and converts to float16 with
round-to-nearest-even, so its output is bit-identical to the reference for every code byte and scale byte.

Scale byte 255 scales by ``2**128``: ``±0.5`` becomes ``±2**127``, larger codes ``±inf``, zero codes stay signed
zeros. The reference computes exactly that wherever ``torch.ldexp`` has its exact integer-exponent kernel (torch
2.13 does); builds whose ``ldexp`` multiplies by ``pow(2, exponent)`` give ``±inf`` for ``±0.5`` and NaN for zero
codes at scale byte 255, and agree everywhere else.

Each program decodes a tile (``TILES``) of checkpoint rows x columns of one expert: it reads the packed bytes
row-major (16 per scale group) and each scale byte once, and writes the tile transposed so that the stores run along
the output's contiguous dimension. The grid spans row tiles x column tiles x experts.
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


TILES: dict[bool, Tile] = {True: Tile(128, 64, 4), False: Tile(128, 64, 4)}
"""The launch tile for each output layout (``transposed`` True / False); ``bench/kernels.py`` times the alternatives
(``sweep_dequantize``)."""

OUTPUT_KINDS: dict[torch.dtype, tuple[int, torch.dtype]] = {
    torch.float32: (0, torch.int32),
    torch.bfloat16: (1, torch.int16),
    torch.float16: (2, torch.int16),
}
"""Output dtype -> (kernel's ``OUT_KIND``, integer dtype of the same width the kernel stores bit patterns through)."""


@triton.jit
def _e2m1_bits(code, scale, OUT_KIND: tl.constexpr):
    """Bit pattern (in the output dtype's width, as int32) of ``E2M1[code] * 2**(scale - 127)`` for int32 tensors."""
    magnitude = code & 7
    exponent_bits = magnitude >> 1
    mantissa = tl.where(exponent_bits > 0, magnitude & 1, 0)  # code 1 (0.5) is 1.0 * 2**-1
    # Biased float32 exponent of the product, from -1 to 257: <= 0 subnormal, >= 255 overflow.
    biased = exponent_bits + scale - 1
    normal = (biased << 23) | (mantissa << 22)
    subnormal = (2 + mantissa) << (tl.minimum(biased, 0) + 21)  # (2 + m) * 2**(biased - 128), in units of 2**-149
    bits = tl.where(biased >= 255, 0x7F800000, tl.where(biased >= 1, normal, subnormal))
    bits = tl.where(magnitude == 0, 0, bits) | ((code >> 3) << 31)
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
def _dequantize_mxfp4_rows_kernel(
    words_ptr, scales_ptr, out_ptr, rows, cols, words_expert_stride, words_row_stride, scales_expert_stride,
    scales_row_stride,
    OUT_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Decode one ``[BLOCK_R, BLOCK_C]`` tile of expert ``program_id(2)`` in the checkpoint's order, reading the
    codes as 32-bit words: the 4 words of a scale group hold its 32 codes, code ``n`` of word ``w`` (bits
    ``4n..4n+3``, little-endian) is column ``32 * group + 8 * w + n``. The tile is ``[rows, groups, 4, 8]``."""
    GROUPS_PER_TILE: tl.constexpr = BLOCK_C // 32
    expert = tl.program_id(2).to(tl.int64)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1) * GROUPS_PER_TILE + tl.arange(0, GROUPS_PER_TILE)
    word = tl.arange(0, 4)
    nibble = tl.arange(0, 8)
    groups = cols // 32
    mask = (row < rows)[:, None] & (group < groups)[None, :]
    scale = tl.load(scales_ptr + expert * scales_expert_stride + row[:, None] * scales_row_stride + group[None, :],
                    mask=mask, other=0).to(tl.int32)[:, :, None, None]
    packed = tl.load(
        words_ptr + expert * words_expert_stride
        + (row[:, None] * words_row_stride + group[None, :] * 4)[:, :, None] + word[None, None, :],
        mask=mask[:, :, None], other=0,
    )
    codes = (packed[:, :, :, None] >> (4 * nibble)[None, None, None, :]) & 15
    values = tl.reshape(_e2m1_bits(codes, scale, OUT_KIND), (BLOCK_R, BLOCK_C))
    column = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out_offsets = expert * rows * cols + row[:, None] * cols + column[None, :]
    out_mask = (row < rows)[:, None] & (column < cols)[None, :]
    tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=out_mask)


WORD_LOADS = True
"""Decode the checkpoint order (``transposed=False``) with ``_dequantize_mxfp4_rows_kernel`` (32-bit loads)."""


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
        if WORD_LOADS and not transposed:
            words = blocks.view(torch.int32) if blocks.storage_offset() % 4 == 0 else blocks.contiguous().view(
                torch.int32)
            _dequantize_mxfp4_rows_kernel[grid](
                words, scales, out.view(bits_dtype), rows, cols, words.stride(0), words.stride(1), scales.stride(0),
                scales.stride(1),
                OUT_KIND=kind, BLOCK_R=tile.rows, BLOCK_C=tile.cols, num_warps=tile.warps,
            )
            return out
        _dequantize_mxfp4_kernel[grid](
            blocks, scales, out.view(bits_dtype), rows, cols, blocks.stride(0), blocks.stride(1), scales.stride(0),
            scales.stride(1),
            OUT_KIND=kind, BLOCK_R=tile.rows, BLOCK_C=tile.cols, TRANSPOSED=transposed, num_warps=tile.warps,
        )
    return out
