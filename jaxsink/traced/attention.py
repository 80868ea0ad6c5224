"""Attention: the one meaning of a score, the bodies that compute it over a block of the
cache, and the attention layer that reads and writes its layer's sink + ring cache.

Letters in shape comments and einsum strings: B batch, C chunk (queries), S / T cache slots of
a block (keys), J chunk keys, D hidden, N query heads, K kv heads, G query heads per kv head,
E = G + 2 (a kv head's query heads, its key and its value), H head dim, V query rotation
variants (see `jaxsink.traced.cache`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsink import config as C
from jaxsink.traced import cache as kv
from jaxsink.traced import quant
from jaxsink.traced.layers import FLOAT, Norm, matrix, param
from jaxsink.traced.rope import rotate
from jaxsink.traced.view import MASKED

# Batch rows x kv heads from which a group's attention runs as one fused multi-threaded kernel
# on XLA:CPU (`_group`); below it the plain form is faster (measured on 2 cores).
FUSED_MIN_PAIRS = 12


def _score(raw: jax.Array, bias: jax.Array | None, softcap: float | None) -> jax.Array:
    """A score from the scaled product q . k (float32): soft-capped (Gemma 2), then plus the
    position bias (ALiBi), if any. Every attention path scores through this function, so a
    change of meaning is made here (the learned sink logits join in `_combine`)."""
    if softcap is not None:
        raw = softcap * jnp.tanh(raw / softcap)
    return raw if bias is None else raw + bias


def _mask(scores: jax.Array, seen: jax.Array) -> jax.Array:
    """Scores of keys a query does not see (`seen` False) set to a large finite negative."""
    return jnp.where(seen, scores, MASKED)


def _select_variant(scores: jax.Array, variant: jax.Array) -> jax.Array:
    """scores [B, K, C, V, G, T], variant [B, 1, T] -> each key's variant's scores
    [B, K, C, G, T]."""
    out = scores[:, :, :, 0]
    for v in range(1, scores.shape[3]):
        out = jnp.where((variant == v)[:, None, :, None, :], scores[:, :, :, v], out)
    return out


def _group(q, keys, values, variant, seen, bias, softcap):
    """Attention of the queries over one group of keys, as partial softmax statistics.

    q: [B, K, C, V', G, H] (scaled; the variants this group can need); keys [B, K, H, T];
    values [B, K, T, H]; variant: [B, 1, T] index into V' (None: V' = 1); seen: [B, C, T];
    bias: [B, K, C, G, T] float32 or None; softcap: static (`_score`).
    Returns (peak [B, K, C, G, 1] the row max, mass [B, K, C, G, 1] the sum of exp(score -
    peak), weighted [B, K, C, G, H] float32 the exp-weighted values); `_combine` merges groups.
    """
    f32 = jnp.float32
    B, K, C_, V, G, H = q.shape
    T = keys.shape[-1]
    rows = q.reshape(B, K, C_ * V * G, H)  # one [rows, H] x [H, T] product per (b, kv head)
    raw = jnp.einsum("bkrh,bkht->bkrt", rows, keys, preferred_element_type=f32)
    if variant is None and B * K >= FUSED_MIN_PAIRS:
        # Fast path (XLA:CPU, tested equal to the plain one): product, score, mask, max and exp
        # fuse into one kernel that runs on every core, but only if the max has no other use,
        # so the peak is recovered outside the kernel as the score of the key with the
        # largest weight, one [H] product per row.
        bias_rows = None if bias is None else bias.reshape(B, K, C_ * G, T)
        visible = jnp.broadcast_to(seen[:, None, :, None, :], (B, 1, C_, G, T))
        visible = visible.reshape(B, 1, C_ * G, T)
        # `_mask` as an added term: a select splits the kernel in two (SmolLM2, B = 16 decode
        # step 104 vs 83 ms); adding -1e30 gives the same scores.
        scores = _score(raw, bias_rows, softcap) + jnp.where(visible, 0.0, MASKED)
        weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # [B, K, R, T]
        top = weights.max(axis=-1, keepdims=True)
        first = jnp.min(jnp.where(weights == top, jnp.arange(T), T), axis=-1)  # [B, K, R]
        first = jnp.minimum(first, T - 1)[..., None]  # [B, K, R, 1]
        best = jnp.take_along_axis(keys, first.swapaxes(-1, -2), axis=-1)  # [B, K, H, R]
        peak = jnp.einsum("bkrh,bkhr->bkr", rows, best, preferred_element_type=f32)
        peak_bias = None if bias_rows is None else jnp.take_along_axis(bias_rows, first, -1)[..., 0]
        peak = _score(peak, peak_bias, softcap)
        peak = _mask(peak, visible.any(axis=-1)).reshape(B, K, C_, G, 1)
        weights = weights.reshape(B, K, C_, G, T)
    else:
        raw = raw.reshape(B, K, C_, V, G, T)
        raw = raw[:, :, :, 0] if variant is None else _select_variant(raw, variant)
        scores = _mask(_score(raw, bias, softcap), seen[:, None, :, None, :])  # [B, K, C, G, T]
        peak = scores.max(axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
    weighted = jnp.einsum(
        "bkcgs,bksh->bkcgh", weights.astype(values.dtype), values, preferred_element_type=f32
    )
    return peak, weights.sum(axis=-1, keepdims=True), weighted


def _int8_group(q, keys: kv.Int8Block, values: kv.Int8Block, lap_masks, bias, softcap):
    """`_group` over an int8 ring block: every key scored by every query variant, only its
    own variant's score kept (`lap_masks`), with the codes' scales applied to the scores and
    to the weights (no float copy of the block is ever made).

    q: [B, K, C, V, G, H] (scaled); keys: codes [B, K, H, T], scales [B, K, 1, T]; values:
    codes [B, K, T, H], scales [B, K, T, 1]; lap_masks: [B, V, C, T] float32, 0 where a
    variant's queries see a key, -1e30 elsewhere (the two laps of the ring, or V = 1 for a
    layer without rotary positions); bias: [B, K, C, G, T] float32 or None; softcap: static.
    Returns `_group`'s (peak, mass, weighted).

    Shaped for XLA:CPU (SmolLM2, B = 16): the variants' scores are masked by an added -1e30
    and share one max, and the peak is recovered outside that kernel as in `_group`'s fast
    path, so product, scales, mask, max and exp fuse with the codes' conversion into one
    kernel; rows are variant-major, since a size-1 chunk axis between variant and head axes
    makes XLA copy the scores first; each variant's weights go through the value product
    and are summed after it (the same sum in another order), since a product followed by a
    sum takes the values' conversion into its kernel and a product alone does not. A per-key
    select of the variants' scores split the kernels, and materialized converted codes cost
    more than the float32 cache's reads.
    """
    f32 = jnp.float32
    B, K, C_, V, G, H = q.shape
    T, CG = keys.codes.shape[-1], C_ * G
    if C_ > 1:  # a prefill chunk, where the products' arithmetic dominates
        return _int8_chunk_group(q, keys, values, lap_masks, bias, softcap)
    rows = q.transpose(0, 1, 3, 2, 4, 5).reshape(B, K, V, CG, H)  # variant-major
    raw = jnp.einsum(
        "bkvch,bkht->bkvct", rows, keys.codes.astype(q.dtype), preferred_element_type=f32
    )
    raw = raw * keys.scale[:, :, None]  # [B, K, V, CG, T]: each key's scale
    mask = lap_masks[:, None, :, :, None, :]  # [B, 1, V, C, 1, T]
    mask = jnp.broadcast_to(mask, (B, 1, V, C_, G, T)).reshape(B, 1, V, CG, T)
    if bias is not None:
        bias = jnp.broadcast_to(bias.reshape(B, K, 1, CG, T), (B, K, V, CG, T))
    scores = _score(raw, bias, softcap) + mask
    each = jnp.exp(scores - scores.max(axis=(2, 4), keepdims=True))  # [B, K, V, CG, T]
    weights = each.sum(axis=2)  # [B, K, CG, T]: each key under its own variant
    # The peak: the score of the key of largest weight (1 = exp(0)), under its variant.
    top = weights.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(weights == top, jnp.arange(T), T), axis=-1)  # [B, K, CG]
    at = jnp.minimum(first, T - 1)[:, :, None, :]  # [B, K, 1, CG]
    best = jnp.take_along_axis(keys.codes, at, axis=-1).astype(q.dtype)  # [B, K, H, CG]
    peak = jnp.einsum("bkvch,bkhc->bkvc", rows, best, preferred_element_type=f32)
    peak = peak * jnp.take_along_axis(keys.scale, at, axis=-1)  # [B, K, V, CG]
    at = at[..., None]  # [B, K, 1, CG, 1]
    peak_bias = None if bias is None else jnp.take_along_axis(bias, at, -1)[..., 0]
    peak = _score(peak, peak_bias, softcap) + jnp.take_along_axis(mask, at, -1)[..., 0]
    peak = peak.max(axis=2).reshape(B, K, C_, G, 1)
    mass = weights.sum(axis=-1).reshape(B, K, C_, G, 1)
    each = each * values.scale.reshape(B, K, 1, 1, T)  # each value's scale
    weighted = jnp.einsum(
        "bkvcs,bksh->bkvch", each, values.codes.astype(q.dtype), preferred_element_type=f32
    ).sum(axis=2)
    return peak, mass, weighted.reshape(B, K, C_, G, H)


def _int8_chunk_group(q, keys: kv.Int8Block, values: kv.Int8Block, lap_masks, bias, softcap):
    """`_int8_group` for a chunk of several queries, where the arithmetic dominates (prefill):
    each key's score taken from its own variant (the one its mask keeps), then one softmax and
    one value product, as `_group`'s plain form (for SmolLM2's 128-token chunks, 145 against
    75 tok/s for the decode form, which runs every product and exp for both variants)."""
    f32 = jnp.float32
    B, K, C_, V, G, H = q.shape
    T = keys.codes.shape[-1]
    rows = q.reshape(B, K, C_ * V * G, H)
    raw = jnp.einsum(
        "bkrh,bkht->bkrt", rows, keys.codes.astype(q.dtype), preferred_element_type=f32
    )
    raw = (raw * keys.scale).reshape(B, K, C_, V, G, T)
    kept = lap_masks.transpose(0, 2, 1, 3)[:, None, :, :, None, :] == 0  # [B, 1, C, V, 1, T]
    own = raw[:, :, :, 0]  # [B, K, C, G, T]: each key's score under its own variant
    for v in range(1, V):
        own = jnp.where(kept[:, :, :, v], raw[:, :, :, v], own)
    scores = _mask(_score(own, bias, softcap), kept.any(axis=3))
    peak = scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    mass = weights.sum(axis=-1, keepdims=True)
    weights = weights * values.scale.reshape(B, K, 1, 1, T)  # each value's scale
    weighted = jnp.einsum(
        "bkcgs,bksh->bkcgh", weights, values.codes.astype(q.dtype), preferred_element_type=f32
    )
    return peak, mass, weighted


def _skipped_group(q, *_):
    """`_group`'s result for keys no query sees: no mass."""
    B, K, C_, _, G, H = q.shape
    zeros = jnp.zeros((B, K, C_, G, 1), jnp.float32)
    return zeros + MASKED, zeros, jnp.zeros((B, K, C_, G, H), jnp.float32)


def _combine(parts, sinks: jax.Array | None):
    """Merge `_group` results into the softmax-weighted values [B, K, C, G, H] float32.
    sinks: learned sink logits [K, G] (float32) that join every softmax's denominator with a
    value of zero (gpt-oss), or None."""
    if sinks is not None:
        peak = jnp.broadcast_to(sinks[None, :, None, :, None], parts[0][0].shape)
        parts = [*parts, (peak, jnp.ones_like(peak), 0.0)]
    top = functools.reduce(jnp.maximum, [peak for peak, _, _ in parts])
    scales = [jnp.exp(peak - top) for peak, _, _ in parts]
    total = sum(mass * c for (_, mass, _), c in zip(parts, scales, strict=True))
    return sum(weighted * c for (_, _, weighted), c in zip(parts, scales, strict=True)) / total


def _alibi_bias(slopes: tuple[float, ...], dist: jax.Array, K: int) -> jax.Array:
    """-slope[n] * d: slopes of the N query heads, dist [B, C, T] -> [B, K, C, G, T]."""
    s = jnp.asarray(slopes, jnp.float32).reshape(K, -1)  # [K, G]
    return -s[None, :, None, :, None] * dist[:, None, :, None, :]


def after(x: jax.Array, rows: jax.Array, axis: int = 0) -> jax.Array:
    """x [..., B, ...] (batch along `axis`) made to depend on `rows` [B] without changing it:
    each batch row on its own row only, and a non-finite value never leaking in (0 * inf
    would be NaN)."""
    zero = _zeros_of(rows)
    shape = [1] * x.ndim
    shape[axis] = -1
    return x + zero.reshape(shape).astype(x.dtype)


def split(x: jax.Array, shapes: tuple) -> list[jax.Array]:
    """Segments' tokens laid end to end, x [..., 1, N], back to each segment's [..., B, C]
    (`shapes`: each (B, C)); one segment's x [..., B, C] as it is."""
    if len(shapes) == 1:
        return [x]
    parts, start = [], 0
    for b, c in shapes:
        parts.append(x[..., 0, start : start + b * c].reshape(*x.shape[:-2], b, c))
        start += b * c
    return parts


def _zero(values: list[jax.Array]) -> jax.Array:
    """A float32 zero that depends on every scalar of `values` (`_zeros_of`)."""
    return _zeros_of(jnp.stack([v.astype(jnp.float32) for v in values])).sum()


def _zeros_of(x: jax.Array) -> jax.Array:
    """Zeros shaped as `x` that depend on it, never NaN (a non-finite value counts as zero:
    0 * inf would be NaN)."""
    return jnp.where(jnp.isfinite(x), x, 0) * 0


def joined(parts: list[jax.Array]) -> jax.Array:
    """`split`'s inverse: segments [..., B, C] laid end to end [..., 1, N] (one as it is)."""
    if len(parts) == 1:
        return parts[0]
    return jnp.concatenate([p.reshape(*p.shape[:-2], 1, -1) for p in parts], axis=-1)


class Attention(nnx.Module):
    """Self-attention of a chunk over one layer's cached sink and ring slots plus its own keys.

    Weights: `qkv` [K, E, H, D] (per kv head its G query heads, its key, its value: one product
    for all three, split along kv heads for sharding), `out` [D, N, H]; optional `qkv_bias`
    [K, E, H], `out_bias` [D], `q_norm` [N, H] / `k_norm` [K, H] (qk-norm, one weight row per
    head) and `sinks` [N] (learned sink logits).
    """

    def __init__(self, spec: C.Attention, hidden: int, dtype, quantized: C.LayerQuant = FLOAT):
        self.spec = spec
        K, E, H, N = spec.num_kv_heads, spec.group + 2, spec.head_dim, spec.num_heads
        qkv_names = ("kv_heads", None, "head_dim", "embed")
        self.qkv = matrix((K, E, H, hidden), qkv_names, dtype, quantized.qkv)
        self.qkv_bias = (
            param((K, E, H), ("kv_heads", None, "head_dim"), dtype) if spec.qkv_bias else None
        )
        self.out = matrix((hidden, N, H), ("embed", "heads", "head_dim"), dtype, quantized.out)
        self.out_bias = param((hidden,), ("embed",), dtype) if spec.out_bias else None
        qk, joint = spec.qk_norm, 2 if spec.qk_norm_scope == "all" else 1
        self.q_norm = None if qk is None else Norm(qk, (N, H), ("heads", "head_dim"), dtype, joint)
        self.k_norm = (
            None if qk is None else Norm(qk, (K, H), ("kv_heads", "head_dim"), dtype, joint)
        )
        self.sinks = param((N,), ("heads",), dtype) if spec.learned_sinks else None

    def __call__(self, h: jax.Array, lcs: tuple, views: tuple, shapes: tuple):
        """h: one segment's tokens [D, B, C] (feature-major, see `Decoder`), or several
        segments' laid end to end [D, 1, N] (`split`); per segment, its layer cache `lcs[i]`
        (one key [B, K, H, n] and value [B, K, n, H] buffer per block of n slots, see
        `views[i]["blocks"]`), its view and its (B, C) `shapes[i]`. The projections run once
        over every segment's tokens, attention per segment over its own cache.
        Returns (out, h's shape; the updated layer caches): each chunk's surviving keys/values
        are written into its cache after attention read it.
        """
        spec = self.spec
        qkv = quant.product(self.qkv, h)  # [K, E, H, B, C]
        if self.qkv_bias is not None:
            qkv += self.qkv_bias[...][..., None, None]
        if spec.clip_qkv is not None:
            qkv = jnp.clip(qkv, -spec.clip_qkv, spec.clip_qkv)
        attended = [
            self._attend(part, lc, view)
            for part, lc, view in zip(split(qkv, shapes), lcs, views, strict=True)
        ]
        # Segments after the first may hold rows gathered out of the buffers the first writes
        # in place: every write waits for every segment's reads, and the segments write last to
        # first, each after the later ones' written buffers (made from the gathered rows), so
        # that XLA can order the gathers before the in-place writes instead of copying the
        # cache. `read`: a zero that depends on all of that.
        read = None
        if len(attended) > 1:
            read = _zero([out[0, 0, 0, 0] for out, _ in attended])
        new = [None] * len(attended)
        for i in reversed(range(len(attended))):
            new[i] = attended[i][1](read)
            if read is not None:
                read = read + _zero([x.reshape(-1)[0] for x in jax.tree.leaves(new[i])])
        new = tuple(new)
        out = quant.product(self.out, joined([out for out, _ in attended]), n_in=2)  # [D, B, C]
        if self.out_bias is not None:
            out += self.out_bias[...][:, None, None]
        return out, new

    def _attend(self, qkv: jax.Array, lc: kv.LayerCache, view: dict):
        """One segment's attention: its projections qkv [K, E, H, B, C], its layer cache and
        view -> (the heads' outputs [N, H, B, C], `write`: the layer cache with the chunk's
        keys and values written, given a zero scalar that depends on every other segment's
        reads (None when there are none)).
        Intermediates keep (batch, kv head) leading, like the cache, so every score and value
        product is one batched matrix product over B * K.
        """
        spec = self.spec
        *_, B, C_ = qkv.shape
        K, G, H = spec.num_kv_heads, spec.group, spec.head_dim
        qkv = qkv.transpose(3, 4, 0, 1, 2)  # [B, C, K, E, H]
        q = qkv[:, :, :, :G].reshape(B, C_, K * G, H)
        k = qkv[:, :, :, G]  # [B, C, K, H]
        v = qkv[:, :, :, G + 1]  # [B, C, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # [B, C, N, H], [B, C, K, H]
        position = spec.position
        rot = view["rotary"][position] if isinstance(position, C.Rotary) else None
        n_var = view["n_variants"] if rot is not None else 1
        q = jnp.broadcast_to(q[:, :, None], (B, C_, n_var, K * G, H))
        if rot is not None:
            q, k = rotate(q, rot["q"], position), rotate(k, rot["k"], position)
        q = (q * jnp.asarray(spec.query_scale, q.dtype)).reshape(B, C_, n_var, K, G, H)
        q = q.transpose(0, 3, 1, 2, 4, 5)  # [B, K, C, V, G, H]

        def bias(dist):  # the ALiBi term of a group's scores [B, K, C, G, T], or None
            if not isinstance(position, C.Alibi):
                return None
            return _alibi_bias(position.slopes, dist, K)

        # An int8 cache quantizes the chunk's ring keys and values as it will store them, and
        # every query sees them so (its own included): a chunk then gives exactly what its
        # tokens give one by one, and the codes are written below.
        int8 = lc.int8
        if int8:
            both = jnp.stack([k, v])  # [2, B, C, K, H]: keys and values quantized at once
            codes, scale = kv.quantize(both)
            ring = view["ring_token"][:, :, None, None]  # [B, C, 1, 1]
            read = jnp.where(ring, kv.dequantize(codes, scale), both.astype(jnp.float32))
            k_seen, v_seen = read[0], read[1]
        else:
            k_seen, v_seen = k, v
        # Groups of keys, each scored by the query variants it can need: the sink block with
        # the chunk's own keys (SINK or a ring variant per key; small, so one group saves a
        # group's fixed costs), then each ring block (its ring variants: one, or an int8
        # cache's two laps). A dense cache's block that no query of the chunk can see yet is
        # skipped at run time.
        small_keys, small_values = k_seen.transpose(0, 2, 3, 1), v_seen.transpose(0, 2, 1, 3)
        seen, variant = view["see_chunk"], view["var_chunk"] if rot is not None else None
        dist = view.get("dist_chunk")
        blocks = list(zip(view["blocks"], view["live"], lc.keys, lc.values, strict=True))
        if view["n_sinks"]:
            (_, n), _, sink_keys, sink_values = blocks.pop(0)
            small_keys = jnp.concatenate([sink_keys, small_keys], axis=-1)
            small_values = jnp.concatenate([sink_values, small_values], axis=-2)
            seen = jnp.concatenate([view["see_cached"][..., :n], seen], axis=-1)
            if variant is not None:
                sinks = jnp.full((B, 1, n), view["sink_variant"], variant.dtype)
                variant = jnp.concatenate([sinks, variant], -1)
            if dist is not None:
                dist = jnp.concatenate([view["dist_cached"][..., :n], dist], axis=-1)
        group = functools.partial(_group, softcap=spec.softcap)
        parts = [group(q, small_keys, small_values, variant, seen, bias(dist))]
        n_ring = view["ring_variants"] if rot is not None else 1
        for (start, n), live, keys, values in blocks:
            dist = view.get("dist_cached")
            block_bias = None if dist is None else bias(dist[..., start : start + n])
            if int8:  # each ring variant's queries see the keys of their laps
                masks = view["lap_masks"][n_ring][..., start : start + n]  # [B, V, C, n]
                args = (q[:, :, :, :n_ring], keys, values, masks, block_bias)
                read = functools.partial(_int8_group, softcap=spec.softcap)
            else:
                seen = view["see_cached"][..., start : start + n]  # [B, C, n]
                args = (q[:, :, :, kv.RING : kv.RING + 1], keys, values, None, seen, block_bias)
                read = group
            parts.append(
                read(*args) if live is None else jax.lax.cond(live, read, _skipped_group, *args)
            )
        sinks = None if self.sinks is None else self.sinks[...].astype(jnp.float32).reshape(K, G)
        out = _combine(parts, sinks).astype(v.dtype)  # [B, K, C, G, H]
        # The written keys/values are made to depend on `out`, which read the whole old cache:
        # only a data dependence lets XLA prove the write comes after the reads and do it in
        # place (an optimization_barrier does not); otherwise it copies every cache buffer
        # twice. Row by row, so a non-finite row cannot reach another row's cache. `read`:
        # the other segments' reads, which may have gathered rows out of the same buffers.

        def write(read: jax.Array | None) -> kv.LayerCache:
            first = out[:, 0, 0, 0, 0] if read is None else out[:, 0, 0, 0, 0] + read  # [B]
            k_new, v_new = after(k, first), after(v, first)
            if int8:
                codes_new, scale_new = after(codes, first, axis=1), after(scale, first, axis=1)
                k_int8 = kv.Int8Block(codes_new[0], scale_new[0])
                v_int8 = kv.Int8Block(codes_new[1], scale_new[1])
            else:
                k_int8 = v_int8 = None
            new = _write(lc, k_new, v_new, view["write_slot"], view["blocks"], k_int8, v_int8)
            if rot is not None:
                new = _rebase(new, rot["rebase"], view["blocks"], view["n_sinks"], position)
            return new

        return out.transpose(1, 3, 4, 0, 2).reshape(K * G, H, B, C_), write  # [N, H, B, C]


def _write(
    lc: kv.LayerCache,
    k_new,
    v_new,
    write_slot,
    blocks,
    k_int8: kv.Int8Block | None = None,
    v_int8: kv.Int8Block | None = None,
) -> kv.LayerCache:
    """Store a chunk's keys/values [B, C, K, H] at `write_slot` [B, C] (cache slots, sinks then
    ring; K = dropped) into the blocks holding them, in place once attention has read the old
    contents. blocks: (first slot, slots) of each block. k_int8, v_int8: the chunk's codes
    [B, C, K, H] and scales [B, C, K, 1] (`quantize`), which an int8 block stores."""
    rows = jnp.arange(write_slot.shape[0])[:, None]  # [B, 1]

    def put_key(buffer, slot, new):  # [B, K, H, n]; [B, C] index axes first: [B, C, K, H]
        return buffer.at[rows, :, :, slot].set(new.astype(buffer.dtype), mode="drop")

    def put_value(buffer, slot, new):  # [B, K, n, H]
        return buffer.at[rows, :, slot].set(new.astype(buffer.dtype), mode="drop")

    def put(put_one, buffer, slot, new, new_int8):
        if isinstance(buffer, kv.Int8Block):
            return kv.Int8Block(
                put_one(buffer.codes, slot, new_int8.codes),
                put_one(buffer.scale, slot, new_int8.scale),
            )
        return put_one(buffer, slot, new)

    keys, values = [], []
    for (start, n), kb, vb in zip(blocks, lc.keys, lc.values, strict=True):
        inside = (write_slot >= start) & (write_slot < start + n)
        slot = jnp.where(inside, write_slot - start, n)  # n: dropped
        keys.append(put(put_key, kb, slot, k_new, k_int8))
        values.append(put(put_value, vb, slot, v_new, v_int8))
    return lc.replace(keys=tuple(keys), values=tuple(values))


def _rebase(lc: kv.LayerCache, rebase, blocks, n_sinks: int, spec: C.Rotary) -> kv.LayerCache:
    """Rotate every ring key back by its row's shift of the ring base (see `jaxsink.traced.cache`),
    at run time only when some row's chunk entered a later lap (once per W tokens).
    rebase: the view's entry, None for a cache that never wraps."""
    if rebase is None:
        return lc
    moved, (cos, sin) = rebase  # cos, sin [B, 1, R/2]
    back = (cos[..., None], -sin[..., None])  # [B, 1, R/2, 1]: rotation by -shift

    def rotate_back(keys):  # [B, K, H, n]
        return rotate(keys, back, spec, axis=2).astype(keys.dtype)  # the cache's own dtype

    keys = tuple(
        kb if start < n_sinks else jax.lax.cond(moved, rotate_back, lambda x: x, kb)
        for (start, _), kb in zip(blocks, lc.keys, strict=True)
    )
    return lc.replace(keys=keys)


# --- pure entry points ----------------------------------------------------------------------
