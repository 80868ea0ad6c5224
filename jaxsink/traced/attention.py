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
from jaxsink.traced import policy, quant
from jaxsink.traced.layers import FLOAT, Norm, matrix, param
from jaxsink.traced.rope import rotary, rotate
from jaxsink.traced.view import MASKED, Int8View, PolicyView, View, masking

# Batch rows x kv heads from which a float block's attention runs as one fused multi-threaded
# kernel on XLA:CPU (`_fused_cpu`); below it the plain form is faster (measured on 2 cores).
FUSED_MIN_PAIRS = 12


def _score(raw: jax.Array, bias: jax.Array | None, softcap: float | None) -> jax.Array:
    """A score from the scaled product q . k (float32): soft-capped (Gemma 2), then plus the
    position bias (ALiBi), if any. Every attention body scores through this function and
    masks through `view.masking`, so a change of meaning is made here (the learned sink
    logits join in `_combine`)."""
    if softcap is not None:
        raw = softcap * jnp.tanh(raw / softcap)
    return raw if bias is None else raw + bias


def read_block(q, keys, values, seen, bias, softcap):
    """Attention of a group of queries over one group of keys, as partial softmax statistics:
    the one entry to the bodies below, picking one by the platform the step is compiled for
    (`jax.lax.platform_dependent`: an export for tpu or cuda from a CPU machine carries the
    accelerator form) and by shape.

    q: [B, K, C, V, G, H] (scaled; the variants the group is scored by); keys [B, K, H, T]
    and values [B, K, T, H], float or `cache.Int8Block`s (codes with per-key scales, never
    converted to a float copy of the block); seen: [B, V, C, T] bool (`view.Group`); bias:
    [B, K, C, G, T] float32 or None; softcap: static (`_score`).
    Returns (peak [B, K, C, G, 1] the row max, mass [B, K, C, G, 1] the sum of exp(score -
    peak), weighted [B, K, C, G, H] float32 the exp-weighted values); `_combine` merges groups.

    The plain form serves every platform and shape; on CPU two shapes have a form of their own,
    each tested equal to the plain one: a float block read by one variant from `FUSED_MIN_PAIRS`
    batch rows x kv heads (`_fused_cpu`), and an int8 block read by one query (`_int8_decode_cpu`).
    """
    B, K, C_, V, _, _ = q.shape
    args = (q, keys, values, seen, bias)
    plain = functools.partial(_named("attention_plain", _plain), softcap=softcap)
    if isinstance(keys, kv.Int8Block):
        cpu = _int8_decode_cpu if C_ == 1 else None
    else:
        cpu = _fused_cpu if V == 1 and B * K >= FUSED_MIN_PAIRS else None
    if cpu is None:
        return plain(*args)
    cpu = functools.partial(_named(f"attention{cpu.__name__}", cpu), softcap=softcap)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


def _named(name: str, body):
    """`body` run under the name scope `name` (seen in the lowered module: tests check which
    form a step carries)."""

    def run(*args, **kwargs):
        with jax.named_scope(name):
            return body(*args, **kwargs)

    return run


def _plain(q, keys, values, seen, bias, softcap):
    """`read_block`'s plain form: each key scored by its own variant's queries (the one that
    sees it), masked, one softmax and one value product. An int8 block's scales multiply the
    scores and the weights (for SmolLM2's 128-token chunks 145 against 75 tok/s for the
    decode form, which runs every product and exp for every variant)."""
    f32 = jnp.float32
    B, K, C_, V, G, H = q.shape
    int8 = isinstance(keys, kv.Int8Block)
    key_codes = keys.codes.astype(q.dtype) if int8 else keys
    T = key_codes.shape[-1]
    rows = q.reshape(B, K, C_ * V * G, H)  # one [rows, H] x [H, T] product per (b, kv head)
    raw = jnp.einsum("bkrh,bkht->bkrt", rows, key_codes, preferred_element_type=f32)
    if int8:
        raw = raw * keys.scale
    raw = raw.reshape(B, K, C_, V, G, T)
    own = raw[:, :, :, 0]  # [B, K, C, G, T]: each key's score under its own variant
    kept = seen.transpose(0, 2, 1, 3)[:, None, :, :, None, :]  # [B, 1, C, V, 1, T]
    for v in range(1, V):
        own = jnp.where(kept[:, :, :, v], raw[:, :, :, v], own)
    visible = seen.any(axis=1)[:, None, :, None, :]  # [B, 1, C, 1, T]
    scores = _score(own, bias, softcap) + masking(visible)
    peak = scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    mass = weights.sum(axis=-1, keepdims=True)
    if int8:
        weights = weights * values.scale.reshape(B, K, 1, 1, T)  # each value's scale
        value_rows = values.codes.astype(q.dtype)
    else:
        weights, value_rows = weights.astype(values.dtype), values
    weighted = jnp.einsum("bkcgs,bksh->bkcgh", weights, value_rows, preferred_element_type=f32)
    return peak, mass, weighted


def _fused_cpu(q, keys, values, seen, bias, softcap):
    """`read_block`'s form for a float block read by one variant on XLA:CPU, wide batches:
    product, score, mask, max and exp fuse into one kernel that runs on every core, but only
    if the max has no other use, so the peak is recovered outside the kernel as the score of
    the key with the largest weight, one [H] product per row (SmolLM2, B = 16: a decode step
    82 against 103.5 ms)."""
    f32 = jnp.float32
    B, K, C_, _, G, H = q.shape
    T = keys.shape[-1]
    rows = q.reshape(B, K, C_ * G, H)
    raw = jnp.einsum("bkrh,bkht->bkrt", rows, keys, preferred_element_type=f32)
    bias_rows = None if bias is None else bias.reshape(B, K, C_ * G, T)
    visible = jnp.broadcast_to(seen[:, :, :, None, :], (B, 1, C_, G, T)).reshape(B, 1, C_ * G, T)
    scores = _score(raw, bias_rows, softcap) + masking(visible)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # [B, K, R, T]
    top = weights.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(weights == top, jnp.arange(T), T), axis=-1)  # [B, K, R]
    first = jnp.minimum(first, T - 1)[..., None]  # [B, K, R, 1]
    best = jnp.take_along_axis(keys, first.swapaxes(-1, -2), axis=-1)  # [B, K, H, R]
    peak = jnp.einsum("bkrh,bkhr->bkr", rows, best, preferred_element_type=f32)
    peak_bias = None if bias_rows is None else jnp.take_along_axis(bias_rows, first, -1)[..., 0]
    peak = _score(peak, peak_bias, softcap) + masking(visible.any(axis=-1))
    weights = weights.reshape(B, K, C_, G, T)
    weighted = jnp.einsum(
        "bkcgs,bksh->bkcgh", weights.astype(values.dtype), values, preferred_element_type=f32
    )
    return peak.reshape(B, K, C_, G, 1), weights.sum(axis=-1, keepdims=True), weighted


def _int8_decode_cpu(q, keys: kv.Int8Block, values: kv.Int8Block, seen, bias, softcap):
    """`read_block`'s form for an int8 block read by one query on XLA:CPU: every key scored by
    every variant, only its own variant's score kept by the mask, with the codes' scales
    applied to the scores and to the weights.

    Shaped for XLA:CPU (SmolLM2, B = 16): the variants' scores are masked by an added term and
    share one max, and the peak is recovered outside that kernel as in `_fused_cpu`, so
    product, scales, mask, max and exp fuse with the codes' conversion into one kernel; rows
    are variant-major, since a size-1 chunk axis between variant and head axes makes XLA copy
    the scores first; each variant's weights go through the value product and are summed
    after it (the same sum in another order), since a product followed by a sum takes the
    values' conversion into its kernel and a product alone does not. A per-key select of the
    variants' scores split the kernels, and materialized converted codes cost more than the
    float32 cache's reads.
    """
    f32 = jnp.float32
    B, K, C_, V, G, H = q.shape
    T, CG = keys.codes.shape[-1], C_ * G
    rows = q.transpose(0, 1, 3, 2, 4, 5).reshape(B, K, V, CG, H)  # variant-major
    raw = jnp.einsum(
        "bkvch,bkht->bkvct", rows, keys.codes.astype(q.dtype), preferred_element_type=f32
    )
    raw = raw * keys.scale[:, :, None]  # [B, K, V, CG, T]: each key's scale
    mask = masking(seen)[:, None, :, :, None, :]  # [B, 1, V, C, 1, T]
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


def _skipped(q, *_):
    """`read_block`'s result for keys no query sees: no mass."""
    B, K, C_, _, G, H = q.shape
    zeros = jnp.zeros((B, K, C_, G, 1), jnp.float32)
    return zeros + MASKED, zeros, jnp.zeros((B, K, C_, G, H), jnp.float32)


def _combine(parts, sinks: jax.Array | None):
    """Merge `read_block` results into the softmax-weighted values [B, K, C, G, H] float32.
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
        `views[i].blocks`), its view and its (B, C) `shapes[i]`. The projections run once
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

    def _attend_evicting(self, q, k, v, lc: kv.LayerCache, view: PolicyView):
        """`_attend` for a layer cache that evicts by attention: q [B, C, N, H], k, v
        [B, C, K, H] (un-rotated); the chunk's tokens enter one by one (`_entering`), each
        seeing the cache its predecessors left, so any chunk gives what its tokens give fed
        alone; a chunk none of whose tokens finds the cache full evicts nothing, and enters at
        once. Returns `_attend`'s (out, write)."""
        spec = self.spec
        B, C_, N, H = q.shape
        sinks = None if self.sinks is None else self.sinks[...].astype(jnp.float32)
        sinks = None if sinks is None else sinks.reshape(spec.num_kv_heads, spec.group)
        tokens = (q, k, v, view.t, view.valid)

        def at_once(lc):
            out, lc = _entering(spec, *tokens, lc, view, sinks)
            return lc, out

        def one_by_one(lc):
            def enter(lc, token):  # one token: [B, 1, ...]
                out, lc = _entering(spec, *token, lc, view, sinks)
                return lc, out[0]

            moved = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0)[:, :, None], tokens)
            return jax.lax.scan(enter, lc, moved)

        if C_ == 1:
            lc, out = at_once(lc)
        else:
            filling = jnp.all(~view.valid | (view.t < view.stream.capacity))
            lc, out = jax.lax.cond(filling, at_once, one_by_one, lc)
        out = out.astype(v.dtype)  # [C, B, K, G, H]
        return out.transpose(2, 3, 4, 1, 0).reshape(N, H, B, C_), lambda read: lc

    def _attend(self, qkv: jax.Array, lc: kv.LayerCache, view: View):
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
        if isinstance(view, PolicyView):
            return self._attend_evicting(q, k, v, lc, view)
        position = spec.position
        rot = view.rotations_of(position) if isinstance(position, C.Rotary) else None
        n_var = len(view.groups[0].variants) if rot is not None else 1
        q = jnp.broadcast_to(q[:, :, None], (B, C_, n_var, K * G, H))
        if rot is not None:
            q, k = rotate(q, rot.q, position), rotate(k, rot.k, position)
        q = (q * jnp.asarray(spec.query_scale, q.dtype)).reshape(B, C_, n_var, K, G, H)
        q = q.transpose(0, 3, 1, 2, 4, 5)  # [B, K, C, V, G, H]

        # An int8 cache quantizes the chunk's ring keys and values as it will store them, and
        # every query sees them so (its own included): a chunk then gives exactly what its
        # tokens give one by one, and the codes are written below.
        int8 = isinstance(view, Int8View)
        if int8:
            both = jnp.stack([k, v])  # [2, B, C, K, H]: keys and values quantized at once
            codes, scale = kv.quantize(both)
            ring = view.ring_token[:, :, None, None]  # [B, C, 1, 1]
            read = jnp.where(ring, kv.dequantize(codes, scale), both.astype(jnp.float32))
            k_seen, v_seen = read[0], read[1]
        else:
            k_seen, v_seen = k, v
        # The view's groups of keys: the sink block with the chunk's own keys (small, so one
        # group saves a group's fixed costs), then each ring block.
        small_keys, small_values = k_seen.transpose(0, 2, 3, 1), v_seen.transpose(0, 2, 1, 3)
        blocks = list(zip(lc.keys, lc.values, strict=True))
        if view.n_sinks:
            sink_keys, sink_values = blocks.pop(0)
            small_keys = jnp.concatenate([sink_keys, small_keys], axis=-1)
            small_values = jnp.concatenate([sink_values, small_values], axis=-2)
        parts = []
        for group, (keys, values) in zip(
            view.groups, [(small_keys, small_values), *blocks], strict=True
        ):
            if rot is not None:  # the group's variants, a run of the query's
                first = group.variants[0]
                seen, q_group = group.seen, q[:, :, :, first : first + len(group.variants)]
            else:  # one query for every key
                seen, q_group = group.seen.any(axis=1, keepdims=True), q
            bias = None
            if isinstance(position, C.Alibi):
                bias = _alibi_bias(position.slopes, group.dist, K)
            args = (q_group, keys, values, seen, bias)
            read = functools.partial(read_block, softcap=spec.softcap)
            live = group.live
            parts.append(read(*args) if live is None else jax.lax.cond(live, read, _skipped, *args))
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
            new = _write(lc, k_new, v_new, view.write_slot, view.blocks, k_int8, v_int8)
            if rot is not None:
                new = _rebase(new, rot.rebase, view.blocks, view.n_sinks, position)
            return new

        return out.transpose(1, 3, 4, 0, 2).reshape(K * G, H, B, C_), write  # [N, H, B, C]


def _normalized(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Softmax weights of `scores` over the last axis, with the learned sink logits `sinks`
    (broadcasting against scores without its last axis, then a trailing 1; None: none)
    taking their share of the mass."""
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = jnp.maximum(top, sinks)
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + jnp.exp(sinks - top)
    return weights / total


def at_ranks(keys: jax.Array, table: jax.Array, ranks: jax.Array, spec: C.Rotary) -> jax.Array:
    """A block of un-rotated keys [B, K, H, n] each rotated by its slot's rank [B, n].

    The cos/sin are read from the flat table one scalar each, into [B, 2, R/2, n] as the
    rotation reads them (slots minor): XLA:CPU reads a gather of table rows, [B, n, 2, R/2],
    transposed inside the rotation (SmolLM2 under tova, B = 16: a decode step 213 against
    270 ms; `ppl` once the cache is full 210 against 145 tok/s)."""
    half = table.shape[-1]
    at = (ranks * 2 * half)[:, None, None, :] + jnp.arange(2 * half).reshape(1, 2, half, 1)
    cos_sin = table.reshape(-1)[at]  # [B, 2, R/2, n]
    return rotate(keys, (cos_sin[:, None, 0], cos_sin[:, None, 1]), spec, axis=2).astype(keys.dtype)


def _entering(spec: C.Attention, q, k, v, t, valid, lc: kv.LayerCache, view: PolicyView, sinks):
    """A chunk's tokens entering a layer cache that evicts by attention (`policy`): one token,
    or a chunk none of whose tokens finds the cache full (token t < K, whose slot and rank are
    t), so that nothing is evicted while it enters. Each token's attention over the cached
    slots (keys rotated by their ranks, the query at its in-cache position min(t, K)) and
    the chunk's tokens up to itself; then the ranks (and h2o's received attention) moved by
    `policy.enter` token by token, from each token's weights laid out by slot, and the keys and
    values stored where it says.
    q: [B, C, N, H], k, v: [B, C, K, H] (un-rotated); t, valid: [B, C]; sinks: learned sink
    logits [K, G] float32 or None. Returns (out [C, B, K, G, H] float32, the layer cache)."""
    f32 = jnp.float32
    B, C_, _, H = q.shape
    Kh, G = spec.num_kv_heads, spec.group
    stream, slots = view.stream, view.stream.capacity
    at = jnp.minimum(t, slots)  # [B, C]: each token's in-cache position, the tokens before it
    cached = at[:, 0] + 1 - valid[:, 0]  # [B]: the slots filled before the chunk
    position = spec.position
    rotary_position = isinstance(position, C.Rotary)
    k_stored = k
    if rotary_position:
        table = view.table_of(position)
        at_t = rotary(table, at)  # [B, C, 1, R/2]
        q, k = rotate(q, at_t, position), rotate(k, at_t, position)
    q = (q * jnp.asarray(spec.query_scale, q.dtype)).reshape(B, C_, Kh, G, H)
    raws = []
    for (start, size), keys in zip(view.blocks, lc.keys, strict=True):
        if rotary_position:  # each key at its rank
            keys = at_ranks(keys, table, lc.ranks[:, start : start + size], position)
        raws.append(jnp.einsum("bckgh,bkhs->bkcgs", q, keys, preferred_element_type=f32))
    raws.append(jnp.einsum("bckgh,bjkh->bkcgj", q, k, preferred_element_type=f32))
    raw = jnp.concatenate(raws, axis=-1)  # [B, K, C, G, T]: the slots, then the chunk
    earlier = jnp.arange(C_)[None, :, None] >= jnp.arange(C_)[None, None, :]  # [1, C, C]
    itself = jnp.eye(C_, dtype=bool)
    seen = jnp.concatenate(
        [
            jnp.broadcast_to(jnp.arange(slots) < cached[:, None, None], (B, C_, slots)),
            earlier & (valid[:, None, :] | itself),
        ],
        axis=-1,
    )  # [B, C, T]
    bias = None
    if isinstance(position, C.Alibi):  # the query's in-cache position less the key's
        dist = jnp.concatenate(
            [at[:, :, None] - lc.ranks[:, None, :], at[:, :, None] - at[:, None, :]], axis=-1
        )
        slopes = jnp.asarray(position.slopes, f32).reshape(Kh, G)
        bias = -slopes[None, :, None, :, None] * dist[:, None, :, None, :].astype(f32)
    scores = _score(raw, bias, spec.softcap) + masking(seen)[:, None, :, None, :]
    sinks = None if sinks is None else sinks[None, :, None, :, None]
    weights = _normalized(scores, sinks)  # [B, K, C, G, T]
    out = jnp.einsum(
        "bkcgj,bjkh->bkcgh", weights[..., slots:].astype(v.dtype), v, preferred_element_type=f32
    )
    for (start, size), values in zip(view.blocks, lc.values, strict=True):  # [B, K, n, H]
        block = weights[..., start : start + size].astype(values.dtype)
        out = out + jnp.einsum("bkcgs,bksh->bkcgh", block, values, preferred_element_type=f32)
    # Each token's weights by slot, as `policy.enter` takes them: the cached slots, its chunk's
    # earlier tokens at their slots (t), then itself.
    mean = weights.mean(axis=(1, 3))  # [B, C, T]
    chunk = jnp.where(earlier & ~itself, mean[..., slots:], 0.0)  # [B, C, C]
    into = jnp.where(valid, at, slots)  # [B, C]: an earlier chunk token's slot, K for none
    rows = jnp.arange(B)[:, None, None]
    by_slot = (
        mean[..., :slots]
        .at[rows, jnp.arange(C_)[None, :, None], into[:, None, :]]
        .add(chunk, mode="drop")
    )
    own = jnp.diagonal(mean[..., slots:], axis1=1, axis2=2)  # [B, C]
    by_slot = jnp.concatenate([by_slot, own[..., None]], axis=-1)  # [B, C, K + 1]

    def enter(state, token):
        ranks, received = state
        w, n, ok = token
        slot, ranks, received = policy.enter(
            stream.policy, stream.sinks, stream.recent, w, ranks, received, n, ok
        )
        return (ranks, received), slot

    per_token = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (by_slot, at, valid))
    (ranks, received), slot = jax.lax.scan(enter, (lc.ranks, lc.scores), per_token)
    # Written after every read of the old cache (a data dependence, as in `_attend`), so the
    # write is in place: the slot depends on the scores, the key and value on the output.
    first = out[:, 0, 0, 0, 0]  # [B]
    k_new, v_new = after(k_stored, first), after(v, first)
    new = _write(lc, k_new, v_new, slot.T, view.blocks)
    return out.transpose(2, 0, 1, 3, 4), new.replace(ranks=ranks, scores=received)


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
