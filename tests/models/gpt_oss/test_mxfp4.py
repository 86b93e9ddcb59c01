"""MXFP4 codec: exact decoding, agreement with transformers' loader, and the encoder's choices."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from osstune.models.gpt_oss.mxfp4 import dequantize_mxfp4, quantize_mxfp4

# E2M1 code -> value, written out here independently of the module's table.
EXPECTED_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _one_block(byte_values: list[int], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1 expert, 1 row, 1 block] tensor pair from 16 bytes and one scale byte."""
    blocks = torch.tensor(byte_values, dtype=torch.uint8).reshape(1, 1, 1, 16)
    return blocks, torch.tensor([[[scale]]], dtype=torch.uint8)


def _row(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[float]:
    """Dequantise a single-row pair and return the row's 32 values."""
    out = dequantize_mxfp4(blocks, scales, dtype)
    assert out.shape == (1, 32, 1)
    return out[0, :, 0].tolist()


@pytest.mark.parametrize("code", range(16))
def test_each_code_decodes_in_the_low_nibble_to_the_even_column(code: int) -> None:
    values = _row(*_one_block([code] + [0] * 15, scale=127))
    assert values == [EXPECTED_VALUES[code]] + [0.0] * 31
    assert math.copysign(1.0, values[0]) == (-1.0 if code >= 8 else 1.0)


@pytest.mark.parametrize("code", range(16))
def test_each_code_decodes_in_the_high_nibble_to_the_odd_column(code: int) -> None:
    values = _row(*_one_block([0] * 15 + [code << 4], scale=127))
    assert values == [0.0] * 31 + [EXPECTED_VALUES[code]]
    assert math.copysign(1.0, values[31]) == (-1.0 if code >= 8 else 1.0)


def test_both_nibbles_of_every_byte() -> None:
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 1, 16)
    scales = torch.full((1, 16, 1), 127, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    for byte in range(256):
        row, position = divmod(byte, 16)
        assert out[0, 2 * position, row].item() == EXPECTED_VALUES[byte & 0x0F]
        assert out[0, 2 * position + 1, row].item() == EXPECTED_VALUES[byte >> 4]


@pytest.mark.parametrize(
    ("scale", "code", "expected"),
    [
        (127, 2, 1.0),  # 2**0: values unchanged
        (128, 7, 12.0),
        (126, 3, 0.75),
        (137, 15, -6.0 * 1024),
        (100, 1, 0.5 * 2.0**-27),
        (0, 2, 2.0**-127),  # smallest scale: a float32/bf16 subnormal, still exact
        (0, 1, 2.0**-128),
        (254, 2, 2.0**127),  # largest regular scale
        (254, 7, math.inf),  # 6 * 2**127 overflows float32, as in transformers
        (255, 2, math.inf),  # 255 (NaN in the OCP spec) decodes as 2**128 = inf, as in transformers
        (255, 10, -math.inf),
    ],
)
def test_scale_bytes(scale: int, code: int, expected: float) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        assert _row(*_one_block([code] + [0] * 15, scale), dtype)[0] == expected


def test_scale_255_keeps_zero_codes_signed_zero_like_transformers() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        values = _row(*_one_block([0x80] + [0] * 15, scale=255), dtype)
        assert values == [0.0] * 32
        assert [math.copysign(1.0, v) for v in values[:3]] == [1.0, -1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bit_identical_to_transformers_dequantisation(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 70, 4, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, 256, (3, 70, 4), dtype=torch.uint8, generator=generator)
    scales[0, :2, :] = torch.tensor([[0, 1, 254, 255], [126, 127, 128, 200]], dtype=torch.uint8)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    for rows_per_chunk in (4096, 17, 1):
        ours = dequantize_mxfp4(blocks, scales, dtype, rows_per_chunk=rows_per_chunk)
        assert ours.shape == reference.shape == (3, 128, 70)
        assert ours.dtype == dtype and ours.is_contiguous()
        assert torch.equal(ours.view(INT_VIEW[dtype]), reference.view(INT_VIEW[dtype]))


def test_quantize_layout_rows_are_the_output_dimension() -> None:
    weight_EIO = torch.zeros(2, 64, 3)
    weight_EIO[1, 33, 2] = 1.0  # expert 1, input 33 (block 1, odd column 1), output 2
    blocks, scales = quantize_mxfp4(weight_EIO)
    assert blocks.shape == (2, 3, 2, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (2, 3, 2) and scales.dtype == torch.uint8
    assert blocks.count_nonzero().item() == 1
    assert blocks[1, 2, 1, 0].item() == 0x60  # 1.0 = 4.0 (code 6) * 2**-2, in the high nibble
    assert scales[1, 2, 1].item() == 127 - 2
    assert scales.flatten().tolist().count(0) == 11  # all-zero blocks get scale byte 0


def test_quantize_rounds_to_nearest_with_ties_to_even_codes() -> None:
    magnitudes = [0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 6.0]
    expected_codes = [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7]
    row = magnitudes + [-m for m in magnitudes] + [0.0] * (32 - 2 * len(magnitudes))
    blocks, scales = quantize_mxfp4(torch.tensor(row).reshape(1, 32, 1))
    assert scales.item() == 127  # block max 6 = 1.5 * 2**2 -> exponent 0
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten().tolist()
    assert codes[: len(magnitudes)] == expected_codes
    assert codes[len(magnitudes) : 2 * len(magnitudes)] == [c | 8 for c in expected_codes]
    assert codes[2 * len(magnitudes) :] == [0] * (32 - 2 * len(magnitudes))


@pytest.mark.parametrize(
    ("block_max", "scale", "max_code"),
    [
        (6.0, 127, 7),  # fits exactly: the OCP exponent floor(log2(6)) - 2 = 0
        (4.0, 127, 6),
        (3.9, 127, 6),  # mantissa 1.95 > 1.5: OCP would use exponent -1 and clip to 6 * 0.5 = 3; we use 0
        (6.5, 128, 5),  # OCP would clip 6.5 to 6; with exponent 1 it is 3.25 -> 3 -> 6.0
        (7.0, 128, 6),  # 3.5 ties to the even code 6 (4.0) -> 8.0
        (1.5, 125, 7),
        (2.0**-128, 0, 1),  # the exponent clamps at -127: 2**-128 / 2**-127 = 0.5
        (2.0**-130, 0, 0),  # 2**-130 / 2**-127 = 0.125 rounds to 0
    ],
)
def test_shared_scale_is_the_smallest_that_fits_the_block_max(block_max: float, scale: int, max_code: int) -> None:
    row = torch.zeros(1, 32, 1, dtype=torch.float64)
    row[0, 5, 0] = block_max
    blocks, scales = quantize_mxfp4(row)
    assert scales.item() == scale
    assert (blocks[0, 0, 0, 2].item() >> 4) == max_code


def test_quantize_of_dequantize_is_identity_on_grid_values() -> None:
    generator = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (2, 24, 3, 16), dtype=torch.uint8, generator=generator)
    # Give every block a largest magnitude of 4 or 6 (codes 6/7/14/15): then its scale is the one that encodes it.
    largest = torch.randint(6, 8, blocks.shape[:-1], generator=generator).to(torch.uint8)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | largest
    blocks[..., 0] |= torch.randint(0, 2, blocks.shape[:-1], generator=generator).to(torch.uint8) << 3
    scales = torch.randint(1, 253, (2, 24, 3), dtype=torch.uint8, generator=generator)
    again_blocks, again_scales = quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.float32))
    assert torch.equal(again_scales, scales)
    assert torch.equal(again_blocks, blocks)  # includes -0.0 (code 8) staying -0.0
    bf16_blocks, bf16_scales = quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.bfloat16))
    assert torch.equal(bf16_blocks, blocks) and torch.equal(bf16_scales, scales)


def test_requantised_values_are_unchanged_for_any_finite_blocks() -> None:
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 40, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, 253, (2, 40, 2), dtype=torch.uint8, generator=generator)  # 6 * 2**125 still finite
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(values), torch.float32), values)


def test_round_trip_error_on_normal_weights_is_bounded() -> None:
    generator = torch.Generator().manual_seed(4)
    weight_EIO = torch.randn(3, 256, 96, generator=generator) * 0.02
    restored = dequantize_mxfp4(*quantize_mxfp4(weight_EIO, rows_per_chunk=10), torch.float32)
    relative = (torch.linalg.vector_norm(restored - weight_EIO) / torch.linalg.vector_norm(weight_EIO)).item()
    assert relative < 0.12  # measured 0.115 (4.25 bits per weight); the OCP clipping rule gives about the same
    # Per element: the scaled block max lies in (3, 6], the largest grid gap is 2 (4 -> 6), so the error is at
    # most 2**e < block max / 3.
    block_max = weight_EIO.abs().reshape(3, 8, 32, 96).amax(dim=2, keepdim=True)
    error = (restored - weight_EIO).abs().reshape(3, 8, 32, 96)
    assert bool((error <= block_max / 3).all())
    assert torch.equal(
        dequantize_mxfp4(*quantize_mxfp4(weight_EIO.to(torch.bfloat16)), torch.float32),
        dequantize_mxfp4(*quantize_mxfp4(weight_EIO.to(torch.bfloat16).float()), torch.float32),
    )


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(1, 48, 4))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_mxfp4(torch.full((1, 32, 4), math.inf))
    with pytest.raises(ValueError, match=r"\[E, in, out\]"):
        quantize_mxfp4(torch.zeros(32, 4))


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="groups"):
        dequantize_mxfp4(torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.uint8))
