"""The Triton MXFP4 dequantisation kernel (in Triton's interpreter) is bit-identical to ``dequantize_mxfp4``."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

from osstune.models.gpt_oss.mxfp4 import E2M1_VALUES, dequantize_mxfp4

pytestmark = [  # numpy in the interpreter: float16 inf, and scale byte 255 overflowing float32 to inf
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning"),
]

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = list(BITS)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers: equality then means bit-identical (signed zeros, inf, NaN)."""
    return tensor.view(BITS[tensor.dtype])


def every_byte_and_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """One expert of 256 rows (row r has scale byte r) whose 16 blocks hold the code bytes 0..255 in order."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 256, 16, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).expand(1, 256, 16).contiguous()
    return blocks, scales


def random_codes(experts: int, rows: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales, every byte value possible."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(0, 256, (experts, rows, groups), generator=generator, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_byte_and_scale_byte_matches_the_reference(mxfp4_kernels: ModuleType, dtype: torch.dtype):
    # bfloat16 runs in the interpreter too: the kernel stores bit patterns through an int16 view.
    blocks, scales = every_byte_and_scale()
    out = mxfp4_kernels.dequantize_mxfp4_triton(blocks, scales, dtype)
    expected = dequantize_mxfp4(blocks, scales, dtype)
    assert out.shape == expected.shape == (1, 512, 256) and out.dtype == dtype
    assert torch.equal(bits(out), bits(expected))
    assert torch.isinf(out).any() and (out == 0).any()  # the table reaches overflow and underflow


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_byte_and_scale_byte_is_the_exact_product(mxfp4_kernels: ModuleType, dtype: torch.dtype):
    # Independent of torch.ldexp: E2M1 value * 2**(scale - 127) in float64, rounded to float32, then to dtype.
    blocks, scales = every_byte_and_scale()
    out = mxfp4_kernels.dequantize_mxfp4_triton(blocks, scales, dtype)
    exact = torch.tensor(
        [[math.ldexp(E2M1_VALUES[(byte >> 4 * (col % 2)) & 15], scale - 127)
          for scale in range(256)] for byte in range(256) for col in (0, 1)],
        dtype=torch.float64,
    )  # fmt: skip  # [column = 2 * byte + nibble, row = scale]
    assert torch.equal(bits(out[0]), bits(exact.to(torch.float32).to(dtype)))
    # Spot checks: scale 255 scales by 2**128 (0.5 -> 2**127, 1 -> inf, zero stays signed zero); scale 0 by 2**-127.
    column_of = {value: 2 * code for code, value in enumerate(E2M1_VALUES[:8])}
    if dtype != torch.float16:
        assert out[0, column_of[0.5], 255].item() == 2.0**127
        assert out[0, column_of[1.5], 0].item() == 1.5 * 2.0**-127
    assert out[0, column_of[1.0], 255].item() == math.inf
    assert out[0, 2 * 0x88, 255].item() == 0.0 and math.copysign(1.0, out[0, 2 * 0x88, 255].item()) == -1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", [(128, 64, 4), (32, 256, 4), (16, 512, 4)])
@pytest.mark.parametrize(("experts", "rows", "groups"), [(3, 130, 3), (2, 5, 1), (1, 257, 5)])
def test_random_shapes_with_partial_tiles(
    mxfp4_kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tile: tuple[int, int, int],
    experts: int, rows: int, groups: int
):
    # These shapes leave partial tiles on both axes under every tile (row counts off multiples of 16, odd group
    # counts), in both output layouts; in the checkpoint's order a contiguous stack takes the flat kernel (here with
    # a partial last block of 512 bytes) and an expert-minor one the strided kernel.
    expected = bits(dequantize_mxfp4(*random_codes(experts, rows, groups, seed=rows), dtype))
    monkeypatch.setattr(mxfp4_kernels, "FLAT_BLOCK", 512)
    blocks, scales = random_codes(experts, rows, groups, seed=rows)
    expert_minor = (blocks.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
                    scales.permute(1, 0, 2).contiguous().permute(1, 0, 2))
    for transposed, (stack_blocks, stack_scales) in ((True, (blocks, scales)), (False, (blocks, scales)),
                                                     (False, expert_minor)):
        monkeypatch.setitem(mxfp4_kernels.TILES, transposed, mxfp4_kernels.Tile(*tile))
        out = mxfp4_kernels.dequantize_mxfp4_triton(stack_blocks, stack_scales, dtype, transposed=transposed)
        assert out.shape == ((experts, 32 * groups, rows) if transposed else (experts, rows, 32 * groups))
        assert out.is_contiguous()
        assert torch.equal(bits(out), expected if transposed else expected.transpose(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("experts", "rows", "groups"), [(3, 130, 3), (1, 256, 16)])
def test_checkpoint_order_is_the_transpose(
    mxfp4_kernels: ModuleType, dtype: torch.dtype, experts: int, rows: int, groups: int
):
    blocks, scales = every_byte_and_scale() if rows == 256 else random_codes(experts, rows, groups, seed=3)
    out = mxfp4_kernels.dequantize_mxfp4_triton(blocks, scales, dtype, transposed=False)
    assert out.shape == (experts, rows, 32 * groups) and out.is_contiguous()
    expected = dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2)
    assert torch.equal(bits(out), bits(expected.contiguous()))


def test_writes_into_a_given_buffer_and_accepts_expert_slices(mxfp4_kernels: ModuleType):
    blocks, scales = random_codes(4, 40, 2, seed=7)
    buffer = torch.full((2, 64, 40), float("nan"), dtype=torch.bfloat16)
    out = mxfp4_kernels.dequantize_mxfp4_triton(blocks[1:3], scales[1:3], torch.bfloat16, out=buffer)
    assert out is buffer
    assert torch.equal(bits(buffer), bits(dequantize_mxfp4(blocks, scales, torch.bfloat16)[1:3]))


@pytest.mark.parametrize("transposed", [True, False])
def test_reads_row_and_group_slices_in_place(mxfp4_kernels: ModuleType, transposed: bool):
    # The bounded dequantisation decodes a stack in slices of checkpoint rows (forward) or of scale groups
    # (backward); an expert-minor layout (row stride below the expert stride's usual value) works too.
    blocks, scales = random_codes(3, 130, 5, seed=11)
    views = {
        "rows": (blocks[:, 40:100], scales[:, 40:100]),
        "groups": (blocks[:, :, 1:4], scales[:, :, 1:4]),
        "expert-minor": (blocks.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
                         scales.permute(1, 0, 2).contiguous().permute(1, 0, 2)),
    }
    for name, (sliced_blocks, sliced_scales) in views.items():
        assert name == "rows" or not sliced_blocks.is_contiguous()
        out = mxfp4_kernels.dequantize_mxfp4_triton(sliced_blocks, sliced_scales, torch.bfloat16,
                                                    transposed=transposed)
        expected = dequantize_mxfp4(sliced_blocks.contiguous(), sliced_scales.contiguous(), torch.bfloat16)
        if not transposed:
            expected = expected.transpose(1, 2).contiguous()
        assert torch.equal(bits(out), bits(expected)), name


def test_empty_stacks(mxfp4_kernels: ModuleType):
    for experts, rows in ((0, 8), (2, 0)):
        blocks, scales = random_codes(experts, rows, 1, seed=0)
        out = mxfp4_kernels.dequantize_mxfp4_triton(blocks, scales, torch.float16)
        assert out.shape == (experts, 32, rows) and out.dtype == torch.float16


def test_rejects_bad_arguments(mxfp4_kernels: ModuleType):
    blocks, scales = random_codes(1, 4, 1, seed=0)
    kernel = mxfp4_kernels.dequantize_mxfp4_triton
    with pytest.raises(ValueError, match="must be uint8"):
        kernel(blocks.to(torch.int16), scales, torch.float32)
    with pytest.raises(ValueError, match="must be \\[E, rows, groups, 16\\]"):
        kernel(blocks, scales[:, :3], torch.float32)
    with pytest.raises(ValueError, match="writes"):
        kernel(blocks, scales, torch.float64)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernel(blocks, scales, torch.float32, out=torch.empty(1, 4, 32).transpose(1, 2))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernel(blocks, scales, torch.float32, out=torch.empty(1, 32, 4, dtype=torch.float16))
