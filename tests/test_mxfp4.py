"""MXFP4 dequantization (`jaxsink.convert.mxfp4`) bit-equal to transformers' own.

The reference is transformers' `convert_moe_packed_tensors`, the function that dequantizes
gpt-oss expert weights when a model loads without the triton kernels (pure torch on CPU). It
returns the last two axes of a 4-D input swapped; ours keeps the checkpoint's layout.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from jaxsink.convert import mxfp4
from jaxsink.convert.errors import ConvertError
from jaxsink.convert.mxfp4 import dequantize

pytestmark = pytest.mark.torch

# numpy dtype -> (torch dtype, torch and numpy ints of its width, to move and compare bits)
DTYPES = {
    np.dtype(np.float32): (torch.float32, torch.int32, np.uint32),
    np.dtype(ml_dtypes.bfloat16): (torch.bfloat16, torch.int16, np.uint16),
    np.dtype(np.float16): (torch.float16, torch.int16, np.uint16),
    np.dtype(np.float64): (torch.float64, torch.int64, np.uint64),
}


def reference(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """transformers' dequantization of blocks [E, R, G, B] -> [E, G*2B, R], as numpy `dtype`."""
    torch_dtype, torch_bits, bits = DTYPES[np.dtype(dtype)]
    out = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype
    )
    return out.view(torch_bits).numpy().view(bits).view(dtype)


def assert_bit_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    bits = DTYPES[got.dtype][2]
    np.testing.assert_array_equal(got.view(bits), want.view(bits))


def random_mxfp4(shape, rng, low=110, high=140):
    """Random blocks `shape` [..., G, B] and scales [..., G] in [low, high]."""
    blocks = rng.integers(0, 256, shape, dtype=np.uint8)
    scales = rng.integers(low, high + 1, shape[:-1], dtype=np.uint8)
    return blocks, scales


@pytest.mark.parametrize("shape", [(3, 5, 4, 16), (2, 7, 3, 16), (1, 1, 1, 16), (2, 3, 2, 4)])
def test_matches_transformers_float32(shape):
    blocks, scales = random_mxfp4(shape, np.random.default_rng(sum(shape)))
    got = dequantize(blocks, scales)  # [E, R, G*2B]
    assert got.shape == (*shape[:2], shape[2] * 2 * shape[3])
    assert_bit_equal(got.swapaxes(1, 2), reference(blocks, scales, np.float32))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_every_byte_at_every_scale(dtype):
    """Row s holds all 256 bytes under scale byte s, so every (nibble, exponent) pair occurs,
    with the edges: s = 0 (subnormal in float32), 1, 126..128, 254 and 255 (overflows to inf)."""
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 256, 1, 256)).copy()
    scales = np.arange(256, dtype=np.uint8).reshape(1, 256, 1)
    got = dequantize(blocks, scales, dtype)
    assert got.dtype == dtype
    assert_bit_equal(got.swapaxes(1, 2), reference(blocks, scales, dtype))


def test_gpt_oss_layout():
    """gate_up_proj_blocks [E, 2F, D/32, 16] -> [E, 2F, D]; transformers' GptOssExperts holds
    gate_up_proj [E, D, 2F] (and down_proj [E, F, D] from down_proj_blocks [E, D, F/32, 16])."""
    E, D, F = 2, 64, 96
    rng = np.random.default_rng(1)
    gate_up = random_mxfp4((E, 2 * F, D // 32, 16), rng)
    down = random_mxfp4((E, D, F // 32, 16), rng)
    assert dequantize(*gate_up).shape == (E, 2 * F, D)
    assert dequantize(*down).shape == (E, D, F)
    assert reference(*gate_up, np.float32).shape == (E, D, 2 * F)
    assert reference(*down, np.float32).shape == (E, F, D)


def test_nibble_order_by_hand():
    """Low nibble first: byte 0x71 is (0.5, 6.0), 0x9A is (-1.0, -0.5); scale 128 doubles."""
    blocks = np.array([[0x71, 0x9A], [0x71, 0x9A]], np.uint8)  # [G=2, B=2]
    scales = np.array([127, 128], np.uint8)  # [G]
    want = [0.5, 6.0, -1.0, -0.5, 1.0, 12.0, -2.0, -1.0]
    np.testing.assert_array_equal(dequantize(blocks, scales), np.array(want, np.float32))
    assert list(mxfp4.FP4_VALUES) == FP4_VALUES


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunking_does_not_change_the_result(monkeypatch, chunk):
    blocks, scales = random_mxfp4((3, 11, 5, 16), np.random.default_rng(2))
    want = reference(blocks, scales, np.float32)
    monkeypatch.setattr(mxfp4, "ROWS_PER_CHUNK", chunk)
    assert_bit_equal(dequantize(blocks, scales).swapaxes(1, 2), want)


def test_other_ranks_and_strided_inputs():
    """[R, G, B] and [G, B] inputs keep their leading axes; a non-contiguous view works."""
    rng = np.random.default_rng(3)
    blocks, scales = random_mxfp4((2, 6, 3, 16), rng)
    full = dequantize(blocks, scales)  # [2, 6, 96]
    np.testing.assert_array_equal(dequantize(blocks[1], scales[1]), full[1])
    np.testing.assert_array_equal(dequantize(blocks[1, 2], scales[1, 2]), full[1, 2])
    strided = dequantize(blocks[:, ::2], scales[:, ::2])
    np.testing.assert_array_equal(strided, full[:, ::2])
    leading = dequantize(blocks[None], scales[None])  # [1, 2, 6, 96]
    np.testing.assert_array_equal(leading[0], full)


@pytest.mark.parametrize(
    ("blocks", "scales", "match"),
    [
        (np.zeros((2, 3, 16), np.int8), np.zeros((2, 3), np.uint8), "blocks must be a uint8"),
        (np.zeros((2, 3, 16), np.uint8), np.zeros((2, 3), np.int32), "scales must be a uint8"),
        (np.zeros((2, 3, 16), np.float32), np.zeros((2, 3), np.uint8), "blocks must be a uint8"),
        ([[[0] * 16]], np.zeros((1, 1), np.uint8), "blocks must be a uint8 numpy array, got list"),
        (torch.zeros(1, 1, 16, dtype=torch.uint8), np.zeros((1, 1), np.uint8), "got Tensor"),
        (np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8), "do not match"),
        (np.zeros((2, 3, 16), np.uint8), np.zeros((2, 3, 1), np.uint8), "do not match"),
        (np.zeros((2, 3, 16), np.uint8), np.zeros((3, 2), np.uint8), "do not match"),
        (np.zeros(16, np.uint8), np.zeros((), np.uint8), "do not match"),
    ],
)
def test_bad_inputs_are_refused(blocks, scales, match):
    name = "model.layers.0.mlp.experts.down_proj"
    with pytest.raises(ConvertError, match=match) as raised:
        dequantize(blocks, scales, name=name)
    assert str(raised.value).startswith(f"{name}: ")


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, None, "nonsense", np.complex64])
def test_bad_output_dtype_is_refused(dtype):
    blocks, scales = np.zeros((1, 2, 16), np.uint8), np.zeros((1, 2), np.uint8)
    with pytest.raises(ConvertError, match="cannot dequantize MXFP4 to"):
        dequantize(blocks, scales, dtype)
