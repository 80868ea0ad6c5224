"""Sampling with per-row settings, inside the jitted steps: greedy, temperature, top-k and
top-p as arrays [B], so rows with different settings share one executable.

Logits are vocabulary-major ([V, B]) where the model gives them so (`Decoder.logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(logits: jax.Array, axis: int = -1) -> jax.Array:
    """The first index of each row's largest logit along `axis`, the vocabulary: logits [B, V]
    (or [V, B] with axis 0) -> [B] int32.

    Two plain reductions (max, then the smallest index holding it): XLA:CPU runs them several
    times faster than `jnp.argmax`'s paired (value, index) reduction. A row without a largest
    value (NaN) gives the last index rather than one out of range.
    """
    V = logits.shape[axis]
    top = logits.max(axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis % logits.ndim)
    first = jnp.min(jnp.where(logits == top, index, V), axis=axis)
    return jnp.minimum(first, V - 1)


def _threshold(values: jax.Array, enough, iterations: int = 40) -> jax.Array:
    """Per row, the largest t in [min, max] of `values` [V, B] with enough(values >= t) [B] true,
    by bisection (no sort of the vocabulary): within 2^-40 of the row's range."""
    lo, hi = values.min(axis=0), values.max(axis=0)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: enough(values >= lo)
        mid = (lo + hi) / 2
        ok = enough(values >= mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.where(enough(values >= hi), hi, lo)


def sample_rows(logits, keys, temperature, top_k, top_p) -> jax.Array:
    """One token per row from vocabulary-major logits [V, B] float32, each row with its own key
    [B] and settings [B] (temperature 0: greedy, the first largest logit; top_k 0 / top_p 1: no
    cut). Rows never mix: a row's token depends on its own logits, key and settings only."""
    best = greedy(logits, axis=0)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)

    def cut(scaled):
        k = jnp.where(top_k > 0, top_k, scaled.shape[0])
        kth = _threshold(scaled, lambda above: above.sum(axis=0) >= k)
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
        probs = jax.nn.softmax(scaled, axis=0)
        nucleus = _threshold(probs, lambda above: (probs * above).sum(axis=0) >= top_p)
        return jnp.where(probs >= jnp.where(top_p < 1, nucleus, 0.0), scaled, -jnp.inf)

    def draw(scaled):
        wants_cut = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
        scaled = jax.lax.cond(wants_cut, cut, lambda x: x, scaled)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled.T)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), best)

    # all-greedy batches skip the random draw (the common case, and the cheaper one)
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: best, scaled)
