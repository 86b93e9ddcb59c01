"""MXFP4 codec for gpt-oss expert weights, in the layout of the released checkpoints.

A checkpoint stores each expert projection as two uint8 tensors:

- ``*_blocks`` ``[E, rows, cols / 32, 16]``: 32 FP4 (E2M1) codes per block, two per byte, the low nibble holding
  the even column;
- ``*_scales`` ``[E, rows, cols / 32]``: one E8M0 scale per block, ``exponent = scale - 127``.

An element's value is ``E2M1_VALUES[code] * 2**exponent``. ``rows`` is the projection's output dimension, so the
dequantised tensor is transposed to ``[E, in, out]``, the layout of transformers' ``GptOssExperts``
(``gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``).
"""

from __future__ import annotations

import torch

E2M1_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""Value of each 4-bit E2M1 code; bit 3 is the sign."""

BLOCK_SIZE = 32
"""Elements that share one scale."""

SCALE_BIAS = 127
"""E8M0 bias: a scale byte ``s`` means ``2**(s - 127)``."""

E2M1_MAX = 6.0
"""Largest E2M1 magnitude (``1.5 * 2**2``)."""

_E2M1_MIDPOINTS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_MIN_EXPONENT = -SCALE_BIAS
_MAX_EXPONENT = 254 - SCALE_BIAS  # scale byte 255 is NaN in the OCP spec and is never written


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    rows_per_chunk: int = 4096,
) -> torch.Tensor:
    """Decode MXFP4 expert weights to a dense ``[E, in, out]`` tensor.

    The result is bit for bit what transformers loads with ``Mxfp4Config(dequantize=True)``: each value is
    computed exactly in float32 as ``E2M1_VALUES[code] * 2.0**(scale - 127)`` and then cast to ``dtype``. Like
    transformers (``torch.ldexp``), a scale byte of 255 (NaN in the OCP spec) scales by ``2**128``: non-zero codes
    overflow to ``±inf`` and zero codes stay ``±0``; with scale 254 the code for 6 overflows float32 too.

    Args:
        blocks: uint8 ``[E, rows, cols / 32, 16]``, two E2M1 codes per byte (low nibble = even column).
        scales: uint8 ``[E, rows, cols / 32]``, E8M0 block scales.
        dtype: dtype of the returned tensor.
        rows_per_chunk: how many rows of one expert are decoded at a time; bounds the temporary memory to
            about ``20 * rows_per_chunk * cols`` bytes beyond the output.

    Returns:
        The dequantised weights ``[E, cols, rows]`` (input dimension before output dimension), contiguous,
        on the device of ``blocks``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK_SIZE // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 blocks must be [E, rows, groups, {BLOCK_SIZE // 2}] and scales [E, rows, groups]; "
            f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    num_experts, rows, groups, _ = blocks.shape
    cols = groups * BLOCK_SIZE
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    out_EIO = torch.empty(num_experts, cols, rows, dtype=dtype, device=blocks.device)
    for expert in range(num_experts):
        for start in range(0, rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows)
            packed = blocks[expert, start:stop]
            codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(stop - start, groups, BLOCK_SIZE)
            exponents = scales[expert, start:stop].to(torch.int32).sub_(SCALE_BIAS).unsqueeze(-1)
            values = torch.ldexp(lut[codes.long()], exponents)
            out_EIO[expert, :, start:stop] = values.reshape(stop - start, cols).T
    return out_EIO


def quantize_mxfp4(weight_EIO: torch.Tensor, *, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode dense expert weights ``[E, in, out]`` as MXFP4 blocks and scales (the inverse of ``dequantize_mxfp4``).

    Each run of 32 consecutive input-dimension elements of one output row shares a power-of-two scale
    ``2**e``. We pick the smallest ``e`` for which the block's largest magnitude ``amax`` fits the E2M1 range,
    ``amax <= 6 * 2**e``, so no element saturates. This is the OCP MX rule ``e = floor(log2(amax)) - 2``,
    except when ``amax / 2**floor(log2(amax)) > 1.5``: there the OCP rule would clip the block's maximum
    to ±6 (an error up to 25 %) and we take ``e + 1`` instead. ``e`` is clamped to ``[-127, 127]``
    (scale bytes 0..254); an all-zero block gets scale byte 0. Every element divided by ``2**e`` is then
    rounded to the nearest E2M1 value, ties to the even code (the one with a zero mantissa bit), and the
    sign is kept, so ``-0.0`` encodes as code 8.

    Args:
        weight_EIO: finite floating-point weights ``[E, in, out]`` with ``in`` a multiple of 32.
        rows_per_chunk: how many output rows of one expert are encoded at a time (bounds temporary memory).

    Returns:
        ``(blocks, scales)``: uint8 ``[E, out, in / 32, 16]`` and uint8 ``[E, out, in / 32]``, on the device of
        ``weight_EIO``.
    """
    if weight_EIO.dim() != 3 or not weight_EIO.is_floating_point():
        raise ValueError(
            f"expected floating-point weights [E, in, out], got {weight_EIO.dtype} {tuple(weight_EIO.shape)}"
        )
    num_experts, cols, rows = weight_EIO.shape
    if cols % BLOCK_SIZE:
        raise ValueError(f"the input dimension ({cols}) must be a multiple of {BLOCK_SIZE} for MXFP4")
    if not bool(torch.isfinite(weight_EIO).all()):
        raise ValueError("MXFP4 cannot encode non-finite weights (inf or NaN)")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    groups = cols // BLOCK_SIZE
    device = weight_EIO.device
    compute_dtype = torch.promote_types(weight_EIO.dtype, torch.float32)
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=compute_dtype, device=device)
    blocks = torch.empty(num_experts, rows, groups, BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(num_experts, rows, groups, dtype=torch.uint8, device=device)
    for expert in range(num_experts):
        for start in range(0, rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows)
            w = weight_EIO[expert, :, start:stop].T.to(compute_dtype).contiguous()
            w = w.view(stop - start, groups, BLOCK_SIZE)
            exponent = _shared_exponent(w.abs().amax(dim=-1))
            scaled = torch.ldexp(w, -exponent.unsqueeze(-1))
            codes = _nearest_e2m1_magnitude(scaled.abs(), midpoints) | (torch.signbit(scaled).to(torch.uint8) << 3)
            blocks[expert, start:stop] = codes[..., 0::2] | (codes[..., 1::2] << 4)
            scales[expert, start:stop] = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def _shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest power-of-two exponent ``e`` with ``amax <= 6 * 2**e``, clamped to the E8M0 range (int32)."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    shared = exponent.to(torch.int32) - 3  # floor(log2(amax)) - 2, exact
    shared = shared + (mantissa > 0.75).to(torch.int32)  # amax / 2**floor(log2(amax)) > 1.5: the max would clip
    shared = torch.where(amax == 0, torch.full_like(shared, _MIN_EXPONENT), shared)
    return shared.clamp_(_MIN_EXPONENT, _MAX_EXPONENT)


def _nearest_e2m1_magnitude(magnitude: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Code 0..7 of the E2M1 magnitude nearest to each element (ties to the even code; above 6 saturates)."""
    below = torch.bucketize(magnitude, midpoints, right=False)
    above = torch.bucketize(magnitude, midpoints, right=True)
    tie_to_even = (above != below) & (below % 2 == 1)
    return torch.where(tie_to_even, above, below).to(torch.uint8)
