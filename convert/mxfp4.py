"""MXFP4 (OCP microscaling FP4) dequantization in numpy, for gpt-oss MoE expert weights.

gpt-oss checkpoints store each expert projection as two uint8 tensors:
`model.layers.{i}.mlp.experts.{gate_up,down}_proj_blocks` [E, R, G, B] and `..._scales`
[E, R, G]. Row r of expert e is G blocks of 2B FP4 (E2M1) values, two per byte: the low nibble
is the even element, the high nibble the odd one. Block (e, r, g) shares one E8M0 scale byte s
that means 2 ** (s - 127). gpt-oss has B = 16 (32 values per block).

`dequantize` gives exactly what transformers' `convert_moe_packed_tensors` gives, bit for bit,
but keeps the last two axes where transformers swaps them (see `dequantize`). Each value is
the exact product FP4 * 2 ** (s - 127), rounded once to the output dtype: s = 255, which OCP
reserves for NaN, is scaled by 2 ** 128 as transformers does (inf where that overflows).

Letters: E experts, R rows (output features), G blocks per row, B bytes per block.
"""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
import numpy.typing as npt

from .errors import ConvertError

# E2M1 values by nibble: bit 3 is the sign (transformers' FP4_VALUES).
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)  # [16] float64
SCALE_BIAS = 127  # E8M0: byte s means 2 ** (s - 127)
OUT_DTYPES = tuple(np.dtype(t) for t in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))
ROWS_PER_CHUNK = 1 << 16  # blocks per slab: 8 MiB of float32 at B = 16


@functools.lru_cache(maxsize=len(OUT_DTYPES))
def _byte_table(dtype: np.dtype) -> np.ndarray:
    """[256 scale bytes, 256 block bytes, 2] -> the byte's (low, high) nibble values scaled by
    2 ** (s - 127), each computed exactly in float64 and rounded once to `dtype`."""
    exps = np.arange(256) - SCALE_BIAS  # [256]
    nibbles = np.ldexp(FP4_VALUES[None, :], exps[:, None])  # [256, 16], exact in float64
    byte = np.arange(256)  # [256]
    pairs = np.stack([nibbles[:, byte & 0x0F], nibbles[:, byte >> 4]], axis=-1)  # [256, 256, 2]
    with np.errstate(over="ignore", under="ignore"):
        table = pairs.astype(dtype)
    table.flags.writeable = False
    return table


def dequantize(
    blocks: np.ndarray,
    scales: np.ndarray,
    dtype: npt.DTypeLike = np.float32,
    *,
    name: str = "MXFP4 tensor",
) -> np.ndarray:
    """MXFP4 blocks [..., G, B] uint8 and scales [..., G] uint8 -> [..., G*2B] `dtype`.

    Output element [..., g*2B + 2k] is the low nibble of byte blocks[..., g, k] and element
    [..., g*2B + 2k + 1] its high nibble, each as E2M1 times 2 ** (scales[..., g] - 127).
    `dtype` is float32, bfloat16, float16 or float64; `name` (a tensor name) goes into errors.
    Works in slabs of rows, so the only full-size array is the result.

    The layout is the checkpoint's: an expert's rows are its output features, like a torch
    Linear weight [out, in]. transformers' `convert_moe_packed_tensors` returns the same values
    with the last two axes swapped (its `.transpose(1, 2)` of a 4-D input): for gpt-oss,
    `gate_up_proj_blocks` [E, 2F, D/32, 16] -> [E, 2F, D] here, `GptOssExperts.gate_up_proj`
    [E, D, 2F] there (gate and up interleaved along 2F: gate = [..., 0::2], up = [..., 1::2]);
    `down_proj_blocks` [E, D, F/32, 16] -> [E, D, F] here, `down_proj` [E, F, D] there.
    """
    for arg, a in (("blocks", blocks), ("scales", scales)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise ConvertError(f"{name}: MXFP4 {arg} must be a uint8 numpy array, got {got}")
    if blocks.ndim < 2 or scales.shape != blocks.shape[:-1]:
        raise ConvertError(
            f"{name}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
            "(expected blocks [..., G, B] and scales [..., G])"
        )
    try:
        out_dtype = None if dtype is None else np.dtype(dtype)
    except TypeError:
        out_dtype = None
    if out_dtype is None or out_dtype not in OUT_DTYPES:
        raise ConvertError(
            f"{name}: cannot dequantize MXFP4 to {dtype!r} "
            f"(expected one of {[str(t) for t in OUT_DTYPES]})"
        )
    *prefix, G, B = blocks.shape
    rows = math.prod(prefix) * G  # one row per block
    table = _byte_table(out_dtype)  # [256, 256, 2]
    flat_blocks = blocks.reshape(rows, B)  # [rows, B]
    flat_scales = scales.reshape(rows, 1)  # [rows, 1]
    out = np.empty((rows, B, 2), out_dtype)  # [rows, B, 2]: (low, high) nibble per byte
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        r1 = min(r0 + ROWS_PER_CHUNK, rows)
        out[r0:r1] = table[flat_scales[r0:r1], flat_blocks[r0:r1]]  # [r, B, 2]
    return out.reshape(*prefix, G * 2 * B)
