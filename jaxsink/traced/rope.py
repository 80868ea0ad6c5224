"""Rotary position embeddings: cos/sin tables made on the host, applied by index on device.

Letters: P rotary positions, R the rotary dims (`config.Rotary.dim`), N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsink import config as C


def rotary_table(
    n_positions: int, rotary: C.Rotary, span: int = 0, scaled: bool = True
) -> np.ndarray:
    """cos and sin of the RoPE angles at positions 0 .. P-1: [P, 2, R/2] float32, times the
    scaling's cos/sin factor if `scaled` (a rotation that moves cached keys must not scale
    them again). span: how many in-cache positions the cache has (longrope's choice).

    Made on the host (the angles in float32, as Hugging Face computes them, their cos/sin in
    float64) and read by index on device: computed there, XLA would evaluate cos/sin again
    inside every layer's rotation, for every head.
    """
    inv_freq = rotary.inv_freq(span)
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * inv_freq  # [P, R/2]
    angles = angles.astype(np.float64)
    scale = rotary.cos_sin_scale() if scaled else 1.0
    return (scale * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)


def rotary(table: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin at integer positions: table [P, 2, R/2], pos [...] -> two [..., 1, R/2]."""
    cos_sin = table[pos]  # [..., 2, R/2]
    return cos_sin[..., :1, :], cos_sin[..., 1:, :]


def rotate(
    x: jax.Array, cos_sin: tuple[jax.Array, jax.Array], spec: C.Rotary, axis: int = -1
) -> jax.Array:
    """Apply RoPE along `axis`, the head dim (default last: x [..., N, H]). cos_sin: `rotary`
    of one position per row of heads, broadcasting against x with R/2 along `axis`."""
    cos, sin = cos_sin
    axis, R = axis % x.ndim, spec.dim
    rest = jax.lax.slice_in_dim(x, R, x.shape[axis], axis=axis)
    if spec.interleaved:
        x1 = jax.lax.slice_in_dim(x, 0, R, 2, axis=axis)
        x2 = jax.lax.slice_in_dim(x, 1, R, 2, axis=axis)
        pairs = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis + 1)
        out = pairs.reshape(*x.shape[:axis], R, *x.shape[axis + 1 :])
    else:
        x1 = jax.lax.slice_in_dim(x, 0, R // 2, axis=axis)
        x2 = jax.lax.slice_in_dim(x, R // 2, R, axis=axis)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)
    return jnp.concatenate([out, rest], axis=axis) if rest.shape[axis] else out
