"""Eviction by attention in the fixed-shape sink cache: which slot a token's key and value go
to under `tova` or `h2o` (`config.StreamConfig.policy`), computed on device per row and per
layer, with no shape depending on the stream.

A layer's K = S + W slots fill in stream order (token t < K in slot t); the S sinks stay for
good. Once the cache is full, a token entering it makes one of the W others, or itself, leave:
  - tova: the one its query attends to least (the attention weight averaged over the layer's
    heads), as in TOVA (Oren et al., 2024);
  - h2o: the one with the least attention received so far, summed over every query since it
    entered (not decayed, as in H2O, Zhang et al., 2023), among those older than the `recent`
    most recent tokens (the entering one included), which stay.
Ties go to the oldest. Positions are in-cache: a cached token's position is its rank among
the cached tokens in stream order (the sinks 0 .. S-1), the query's the number of tokens
cached before it, so no distance exceeds K. Ranks are kept per slot and moved as tokens leave;
keys are stored un-rotated and rotated by their rank when read.

Letters: B batch, K slots, T = K + 1 (the slots and the entering token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def enter(
    policy: str,
    sinks: int,
    recent: int,
    weights: jax.Array,
    ranks: jax.Array,
    scores: jax.Array | None,
    n: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One token entering a layer's cache under `policy` (static, with `sinks` and `recent`).

    weights: [B, T] float32, the attention the token's query gave each slot and itself
    (averaged over heads; 0 for an empty slot); ranks: [B, K] int32; scores: [B, K] float32
    (h2o) or None; n: [B] int32, the tokens cached before it (min(t, K)); valid: [B] bool
    (False: padding, nothing changes).
    Returns (slot [B] int32 its key and value go to, K for none; ranks; scores).
    """
    B, K = ranks.shape
    full = n >= K
    slot_ids = jnp.arange(K)
    old = jnp.broadcast_to(slot_ids >= sinks, (B, K))  # [B, K]: slots that may be evicted
    received = None if scores is None else scores + weights[:, :K]
    if policy == "tova":
        value = weights
        candidate = jnp.concatenate([old, jnp.ones((B, 1), bool)], axis=1)  # itself too
    else:  # h2o: the entering token and the recent - 1 latest cached ones stay
        value = jnp.concatenate([received, weights[:, K:]], axis=1)
        kept = ranks >= K - recent + 1
        candidate = jnp.concatenate([old & ~kept, jnp.zeros((B, 1), bool)], axis=1)
    rank = jnp.concatenate([ranks, jnp.full((B, 1), K, ranks.dtype)], axis=1)  # [B, T]
    low = jnp.where(candidate, value, jnp.inf).min(axis=1, keepdims=True)
    oldest = jnp.where(candidate & (value == low), rank, 2 * K + 1)
    victim = jnp.argmin(oldest, axis=1)  # [B]: the least attended, the oldest of ties
    victim_rank = jnp.take_along_axis(rank, victim[:, None], axis=1)  # [B, 1]
    slot = jnp.where(valid, jnp.where(full, victim, n), K)  # K: not written
    moved = (valid & full)[:, None] & (ranks > victim_rank)  # later tokens move down one
    ranks = ranks - moved.astype(ranks.dtype)
    rows = jnp.arange(B)
    ranks = ranks.at[rows, slot].set(jnp.where(full, K - 1, n).astype(ranks.dtype), mode="drop")
    if scores is not None:
        scores = jnp.where(valid[:, None], received, scores)
        scores = scores.at[rows, slot].set(weights[:, K], mode="drop")
    return slot, ranks, scores
