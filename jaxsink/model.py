"""The network: one generic Flax NNX decoder block, configured per layer, reading and writing
the sink + ring cache.

`Decoder(cfg)` is an `nnx.Module` whose every weight is an `nnx.Param` with logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`; see `LOGICAL_AXES`), readable with
`nnx.get_partition_spec`. The cache is never module state: `Decoder.__call__(cache, tokens,
valid)` takes it and returns the new one, and the jitted entry points (`step`, `last_logits`)
are pure functions of `(weights, cache, tokens, valid)`, with the module's `nnx.GraphDef`
static: `nnx.merge` rebuilds the module inside the trace.

Static (a change recompiles): the graph definition (the `ModelConfig` included),
`cache.stream` and every shape (batch B, chunk length C, capacity K). Everything that moves
with the stream (`cache.pos`, the tokens, which of them are valid) is an array, so one
compilation serves a stream of any length.

Letters in shape comments and einsum strings: B batch, C chunk (queries), S cache slots (keys:
the sink slots, the ring slots or both, as each comment says), W ring slots, J chunk keys,
D hidden, N query heads, K kv heads, G query heads per kv head, E = G + 2 (a kv head's query
heads, its key and its value), H head dim, F mlp, V vocab (or, next to query tensors, the query
rotation variants: see `jaxsink.cache`), P rotary positions.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink import cache as kv
from jaxsink import config as C
from jaxsink import quant
from jaxsink.config import ModelConfig
from jaxsink.executables import EntryPoint

# Python-side trace counter: jit traces once per compilation, so this counts compilations of
# the model's jitted entry points (tests assert on it).
TRACES: collections.Counter = collections.Counter()

# Every logical axis a weight dimension may carry (None: never sharded).
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts")

_MASKED = -1e30  # finite, so a row with nothing visible (padding) gives no NaN
# Batch rows x kv heads from which a group's attention runs as one fused multi-threaded kernel
# on XLA:CPU (`_group`); below it the plain form is faster (measured on 2 cores).
_FUSED_MIN_PAIRS = 12


def _param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype, fill: float = 0.0):
    """A weight of `shape` whose dimensions carry the logical axis `names` (for sharding)."""
    return nnx.Param(jnp.full(shape, fill, dtype), out_sharding=names, eager_sharding=False)


_FLOAT = C.LayerQuant()  # a layer whose matrices are all float


def _matrix(shape: tuple[int, ...], names: tuple[str | None, ...], dtype, spec: C.Quant | None):
    """A matrix weight [*out, *in] (read by `quant.product`): a float `_param`, or kept
    quantized as `spec` says (`quant.QuantizedWeight`)."""
    if spec is None:
        return _param(shape, names, dtype)
    return quant.QuantizedWeight(spec, shape, names)


# --- norms, rotary, activations ------------------------------------------------------------


class Norm(nnx.Module):
    """`config.Norm` with a weight of `shape`, applied to x [..., *shape] (or, with `axis=0`,
    over the leading axis of a feature-major tensor). Statistics over the last `joint` axes of
    `shape` (1: each row of a per-head weight on its own; 2: every head together). Computed in
    float32, returned in the input's dtype."""

    def __init__(self, spec: C.Norm, shape: tuple[int, ...], names, dtype, joint: int = 1):
        self.spec, self.joint = spec, joint
        self.scale = _param(shape, names, dtype, 0.0 if spec.kind == "rms_plus_one" else 1.0)
        self.bias = _param(shape, names, dtype) if spec.bias else None

    def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """x: [..., *shape] (axis -1), or [D, ...] with axis 0 -> same shape."""
        spec, axis = self.spec, axis % x.ndim
        stats = tuple(range(x.ndim - self.joint, x.ndim)) if axis == x.ndim - 1 else axis
        x32 = x.astype(jnp.float32)
        if spec.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=stats, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=stats, keepdims=True) + spec.eps)

        def along(w):  # weight [*shape] aligned with x's axis
            return w.reshape(w.shape + (1,) * (x.ndim - 1 - axis)) if axis < x.ndim - 1 else w

        w = along(self.scale[...])
        if spec.kind == "rms":  # as Hugging Face Llama: scale times the input-dtype normal
            return w * x32.astype(x.dtype)
        if spec.kind == "rms_plus_one":  # as Gemma: (1 + w) applied in float32
            return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        out = x32 * w.astype(jnp.float32)
        if self.bias is not None:
            out = out + along(self.bias[...]).astype(jnp.float32)
        return out.astype(x.dtype)


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


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _gated(spec: C.Mlp, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The gated MLP's hidden activation from its gate and up projections (same shapes)."""
    if spec.activation == "clamped_swiglu":
        gate = jnp.minimum(gate, spec.limit)
        up = jnp.clip(up, -spec.limit, spec.limit)
        return gate * jax.nn.sigmoid(spec.alpha * gate) * (up + 1)
    return ACTIVATIONS[spec.activation](gate) * up


# --- which keys each query sees (shared by all layers) --------------------------------------


def _attention_view(
    stream: C.StreamConfig,
    pos: jax.Array,
    valid: jax.Array,
    positions,
    span: int,
    dtype,
    int8: bool = False,
):
    """Everything about *which* keys each query sees and at which distance, shared by the
    layers whose caches follow `stream` (their `position`s listed in `positions`), for rows at
    stream positions `pos` [B] reading a chunk with `valid` [B, C]. span: the in-cache
    positions of the model's stream (`_span`), on which longrope's factors depend.

    Returns a dict: the masks against the cached slots (sinks, then ring) [B, C, S] and against
    the chunk's own keys [B, C, J]; the variant scoring each chunk key [B, 1, J]; per distinct
    `Rotary` of the layers, its query rotations (`rotary` of [B, C, V]), key rotations (`rotary`
    of [B, C]) and ring rebase (None for a cache that never wraps, else (whether any row moves
    to a later lap [] bool, `rotary` of each row's shift [B])); if a layer uses ALiBi, the
    contract's distances d(t, k) float32 to the cached slots [B, C, S] and to the chunk
    [B, C, J]; the slot each chunk token is written to ([B, C], K = dropped); whether each
    dense ring block holds a visible key ([] bool; None for blocks always attended) and, static,
    the cache blocks ((first slot, slots) each) and sink count.

    int8: the cache is int8 (static), with its own rotations (the slot rotation of
    `jaxsink.cache`): then also the ring's additive masks per variant count (`lap_masks`),
    whether each chunk token is a ring token ([B, C], quantized like the cache), and no rebase.
    Either way the ring's variants come first (`ring_variants` of them, static) and
    `sink_variant` is the sinks'.
    """
    S, W = stream.sinks, stream.window
    C_ = valid.shape[1]
    t = pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, C]
    pos_after = pos + valid.sum(axis=1, dtype=jnp.int32)  # [B]
    base = kv.ring_base(stream, pos)  # [B]
    cached = kv.slot_tokens(stream, pos)  # [B, S]: sink slots, then ring slots
    chunk = jnp.where(valid, t, -1)  # [B, J]
    tq = t[:, :, None]
    view = {
        "see_cached": kv.visible(stream, tq, cached[:, None, :]),
        "see_chunk": kv.visible(stream, tq, chunk[:, None, :]),
        "rotary": {},
    }
    n_rot = kv.rotation_count(stream, C_)
    if int8:  # slot rotation: keys never re-rotated, two ring variants told apart by lap parity
        view["var_chunk"] = kv.slot_variant(stream, chunk[:, None, :])
        view["n_variants"] = kv.slot_variants(stream)
        view["ring_variants"] = view["sink_variant"] = kv.ring_variants(stream)
        view["ring_token"] = t >= S  # [B, C]
        q_pos = kv.slot_query_rotations(stream, t)  # [B, C, V]
        k_pos = kv.slot_key_rotation(stream, t)  # [B, C]
    else:
        view["var_chunk"] = kv.query_variant(stream, chunk[:, None, :])
        view["n_variants"] = len(kv.used_variants(stream))
        view["ring_variants"], view["sink_variant"] = 1, kv.SINK
        q_pos = kv.query_rotations(stream, t, base[:, None])[..., : view["n_variants"]]
        k_pos = kv.key_rotation(stream, t, base[:, None])  # [B, C]
    shift = kv.ring_base(stream, pos_after) - base  # [B], a multiple of W
    for spec in dict.fromkeys(p for p in positions if isinstance(p, C.Rotary)):
        table = jnp.asarray(rotary_table(n_rot, spec, span), dtype)  # [P, 2, R/2]
        plain = table
        if spec.cos_sin_scale() != 1.0:
            plain = jnp.asarray(rotary_table(n_rot, spec, span, scaled=False), dtype)
        view["rotary"][spec] = {
            "q": rotary(table, q_pos),
            "k": rotary(table, k_pos),
            "rebase": (
                (shift.max() > 0, rotary(plain, shift)) if stream.wraps and not int8 else None
            ),
        }
    if any(isinstance(p, C.Alibi) for p in positions):
        view["dist_cached"] = kv.distance(stream, tq, cached[:, None, :]).astype(jnp.float32)
        view["dist_chunk"] = kv.distance(stream, tq, chunk[:, None, :]).astype(jnp.float32)
    # A chunk token is written unless a later token of the same chunk takes its ring slot.
    kept = valid & ((t < S) | (t >= pos_after[:, None] - W))
    view["write_slot"] = jnp.where(kept, kv.slot_of(stream, t), stream.capacity)
    view["blocks"], view["n_sinks"] = kv.slot_blocks(stream), S  # static
    # Whether any query of the chunk sees any slot of a block, for the blocks worth a run-time
    # test (each costs a conditional per layer to compile): the ring blocks of a cache that
    # never wraps, which stay partly empty for the whole stream (dense). Sinks and a wrapping
    # ring are empty during their first W tokens only: always attended (None).
    view["live"] = tuple(
        None if start < S or stream.wraps else view["see_cached"][..., start : start + n].any()
        for start, n in view["blocks"]
    )
    if int8:
        # The int8 ring's additive masks (`_int8_group`'s `lap_masks`), [B, V, C, S] float32
        # per variant count: for rotary layers one per lap parity (a variant's queries see the
        # keys of its laps), for the others one.
        laps = kv.slot_variant(stream, cached)[:, None, None, :]  # [B, 1, 1, S]
        see = view["see_cached"][:, None]  # [B, 1, C, S]
        own = laps == jnp.arange(kv.ring_variants(stream))[:, None, None]  # [B, V, 1, S]
        masks = {1: see, kv.ring_variants(stream): see & own}
        view["lap_masks"] = {n: jnp.where(m, 0.0, _MASKED) for n, m in masks.items()}
    return view


def _span(stream: C.StreamConfig) -> int:
    """How many in-cache positions a stream's queries and keys take: K + 1 for a cache that
    wraps (the query sits at min(t, K)), K for a dense one. One value for the whole model, so
    that longrope picks one set of factors for every layer, as Hugging Face does for a whole
    sequence."""
    return stream.capacity + 1 if stream.wraps else stream.capacity


# --- the one meaning of attention -----------------------------------------------------------


def _score(raw: jax.Array, bias: jax.Array | None, softcap: float | None) -> jax.Array:
    """A score from the scaled product q . k (float32): soft-capped (Gemma 2), then plus the
    position bias (ALiBi), if any. Every attention path scores through this function, so a
    change of meaning is made here (the learned sink logits join in `_combine`)."""
    if softcap is not None:
        raw = softcap * jnp.tanh(raw / softcap)
    return raw if bias is None else raw + bias


def _mask(scores: jax.Array, seen: jax.Array) -> jax.Array:
    """Scores of keys a query does not see (`seen` False) set to a large finite negative."""
    return jnp.where(seen, scores, _MASKED)


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
    if variant is None and B * K >= _FUSED_MIN_PAIRS:
        # Fast path (XLA:CPU, tested equal to the plain one): product, score, mask, max and exp
        # fuse into one kernel that runs on every core, but only if the max has no other use,
        # so the peak is recovered outside the kernel as the score of the key with the
        # largest weight, one [H] product per row.
        bias_rows = None if bias is None else bias.reshape(B, K, C_ * G, T)
        visible = jnp.broadcast_to(seen[:, None, :, None, :], (B, 1, C_, G, T))
        visible = visible.reshape(B, 1, C_ * G, T)
        # `_mask` as an added term: a select splits the kernel in two (SmolLM2, B = 16 decode
        # step 104 vs 83 ms); adding -1e30 gives the same scores.
        scores = _score(raw, bias_rows, softcap) + jnp.where(visible, 0.0, _MASKED)
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
    return zeros + _MASKED, zeros, jnp.zeros((B, K, C_, G, H), jnp.float32)


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


def _after(x: jax.Array, rows: jax.Array, axis: int = 0) -> jax.Array:
    """x [..., B, ...] (batch along `axis`) made to depend on `rows` [B] without changing it:
    each batch row on its own row only, and a non-finite value never leaking in (0 * inf
    would be NaN)."""
    zero = _zeros_of(rows)
    shape = [1] * x.ndim
    shape[axis] = -1
    return x + zero.reshape(shape).astype(x.dtype)


def _split(x: jax.Array, shapes: tuple) -> list[jax.Array]:
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


def _joined(parts: list[jax.Array]) -> jax.Array:
    """`_split`'s inverse: segments [..., B, C] laid end to end [..., 1, N] (one as it is)."""
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

    def __init__(self, spec: C.Attention, hidden: int, dtype, quantized: C.LayerQuant = _FLOAT):
        self.spec = spec
        K, E, H, N = spec.num_kv_heads, spec.group + 2, spec.head_dim, spec.num_heads
        qkv_names = ("kv_heads", None, "head_dim", "embed")
        self.qkv = _matrix((K, E, H, hidden), qkv_names, dtype, quantized.qkv)
        self.qkv_bias = (
            _param((K, E, H), ("kv_heads", None, "head_dim"), dtype) if spec.qkv_bias else None
        )
        self.out = _matrix((hidden, N, H), ("embed", "heads", "head_dim"), dtype, quantized.out)
        self.out_bias = _param((hidden,), ("embed",), dtype) if spec.out_bias else None
        qk, joint = spec.qk_norm, 2 if spec.qk_norm_scope == "all" else 1
        self.q_norm = None if qk is None else Norm(qk, (N, H), ("heads", "head_dim"), dtype, joint)
        self.k_norm = (
            None if qk is None else Norm(qk, (K, H), ("kv_heads", "head_dim"), dtype, joint)
        )
        self.sinks = _param((N,), ("heads",), dtype) if spec.learned_sinks else None

    def __call__(self, h: jax.Array, lcs: tuple, views: tuple, shapes: tuple):
        """h: one segment's tokens [D, B, C] (feature-major, see `Decoder`), or several
        segments' laid end to end [D, 1, N] (`_split`); per segment, its layer cache `lcs[i]`
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
            for part, lc, view in zip(_split(qkv, shapes), lcs, views, strict=True)
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
        out = quant.product(self.out, _joined([out for out, _ in attended]), n_in=2)  # [D, B, C]
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
            k_new, v_new = _after(k, first), _after(v, first)
            if int8:
                codes_new, scale_new = _after(codes, first, axis=1), _after(scale, first, axis=1)
                k_int8 = kv.Int8Block(codes_new[0], scale_new[0])
                v_int8 = kv.Int8Block(codes_new[1], scale_new[1])
            else:
                k_int8 = v_int8 = None
            new = _write(lc, k_new, v_new, view["write_slot"], view["blocks"], k_int8, v_int8)
            if rot is not None:
                new = _rebase(new, rot["rebase"], view["blocks"], view["n_sinks"], position)
            return new

        return out.transpose(1, 3, 4, 0, 2).reshape(K * G, H, B, C_), write  # [N, H, B, C]


class Mlp(nnx.Module):
    """Gated (`up` [2, F, D]: gate, then up) or plain (`up` [F, D]) MLP, then `down` [D, F];
    optional biases `up_bias` [2, F] / [F] and `down_bias` [D].

    A mixture of experts (`spec.experts`) stacks E such MLPs on a leading `experts` axis
    (`up` [E, 2, F, D], `down` [E, D, F], biases [E, ...]) and adds a `router` [E, D] with an
    optional `router_bias` [E].
    """

    def __init__(self, spec: C.Mlp, hidden: int, dtype, quantized: C.LayerQuant = _FLOAT):
        self.spec = spec
        F, moe = spec.size, spec.experts
        lead = ((moe.num,) if moe else ()) + ((2,) if spec.gated else ())
        names = (("experts",) if moe else ()) + ((None,) if spec.gated else ())
        self.up = _matrix((*lead, F, hidden), (*names, "mlp", "embed"), dtype, quantized.up)
        self.up_bias = _param((*lead, F), (*names, "mlp"), dtype) if spec.bias else None
        lead, names = lead[:1] if moe else (), names[:1] if moe else ()
        self.down = _matrix((*lead, hidden, F), (*names, "embed", "mlp"), dtype, quantized.down)
        self.down_bias = _param((*lead, hidden), (*names, "embed"), dtype) if spec.bias else None
        self.router = _param((moe.num, hidden), ("experts", "embed"), dtype) if moe else None
        self.router_bias = (
            _param((moe.num,), ("experts",), dtype) if moe and moe.router_bias else None
        )

    def _hidden(self, up: jax.Array, axis: int) -> jax.Array:
        """The activation from the up projection, whose gate / up halves (if gated) are the
        two entries of `axis` (removed in the result)."""
        if not self.spec.gated:
            return ACTIVATIONS[self.spec.activation](up)
        gate, up = (jnp.take(up, i, axis=axis) for i in (0, 1))
        return _gated(self.spec, gate, up)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Feature-major: h [D, B, C] -> [D, B, C]."""
        if self.spec.experts is not None:
            return self._experts(h)
        up = quant.product(self.up, h)  # [2, F, B, C] or [F, B, C]
        if self.up_bias is not None:
            up += self.up_bias[...][..., None, None]
        out = quant.product(self.down, self._hidden(up, 0))  # [D, B, C]
        return out if self.down_bias is None else out + self.down_bias[...][:, None, None]

    def route(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's top-k experts and their weights: h [D, B, C] -> (weights [B, C, k] in
        h's dtype, expert indices [B, C, k])."""
        moe = self.spec.experts
        logits = jnp.einsum("ed,dbc->bce", self.router[...], h, preferred_element_type=jnp.float32)
        if self.router_bias is not None:
            logits += self.router_bias[...].astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, C, E]
        top, chosen = jax.lax.top_k(probs, moe.top_k)
        if moe.normalize:
            top = top / top.sum(axis=-1, keepdims=True)
        return top.astype(h.dtype), chosen

    def _experts(self, h: jax.Array) -> jax.Array:
        """The mixture: each token's top-k experts, weighted by their router probabilities.
        With fewer chosen (token, expert) pairs than experts, only the chosen experts' weights
        are read (`experts_gathered`); otherwise every expert runs on every token
        (`experts_all`), which reads each expert once. `scripts/bench.py --sections experts`
        measures both."""
        _, B, C_ = h.shape
        top, chosen = self.route(h)
        if B * C_ * self.spec.experts.top_k < self.spec.experts.num:
            return self.experts_gathered(h, top, chosen)
        return self.experts_all(h, top, chosen)

    def experts_gathered(self, h: jax.Array, top: jax.Array, chosen: jax.Array) -> jax.Array:
        """Only the chosen experts, one (token, expert) pair per step of a loop that slices
        that expert's weights: h [D, B, C], top / chosen [B, C, k] (`route`) -> [D, B, C].
        (Slicing inside a loop lets XLA:CPU read the slice in place; a gather of the chosen
        weights copies them and was slower than running every expert.)"""
        D, B, C_ = h.shape
        k = chosen.shape[-1]
        tokens = h.reshape(D, B * C_)
        experts, weights = chosen.reshape(-1), top.reshape(-1)  # pair p: token p // k

        def expert(p, out):
            e, t = experts[p], p // k
            x = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)  # [D, 1]
            up = jnp.einsum(
                "...fd,dt->...ft", jax.lax.dynamic_index_in_dim(self.up[...], e, 0, False), x
            )
            if self.up_bias is not None:
                up += jax.lax.dynamic_index_in_dim(self.up_bias[...], e, 0, False)[..., None]
            y = jax.lax.dynamic_index_in_dim(self.down[...], e, 0, False) @ self._hidden(up, 0)
            if self.down_bias is not None:
                y += jax.lax.dynamic_index_in_dim(self.down_bias[...], e, 0, False)[:, None]
            y = y * weights[p] + jax.lax.dynamic_slice_in_dim(out, t, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, y, t, axis=1)

        out = jax.lax.fori_loop(0, B * C_ * k, expert, jnp.zeros_like(tokens))
        return out.reshape(D, B, C_)

    def experts_all(self, h: jax.Array, top: jax.Array, chosen: jax.Array) -> jax.Array:
        """Every expert on every token, unchosen ones weighted by zero: same arguments and
        result as `experts_gathered`."""
        weights = jax.nn.one_hot(chosen, self.spec.experts.num, dtype=h.dtype) * top[..., None]
        weights = weights.sum(-2)  # [B, C, E]
        up = jnp.einsum("e...fd,dbc->e...fbc", self.up[...], h)  # [E, (2,) F, B, C]
        if self.up_bias is not None:
            up += self.up_bias[...][..., None, None]
        out = jnp.einsum("edf,efbc->edbc", self.down[...], self._hidden(up, 1))  # [E, D, B, C]
        if self.down_bias is not None:
            out += self.down_bias[...][..., None, None]
        return jnp.einsum("edbc,bce->dbc", out, weights)


class Block(nnx.Module):
    """One decoder layer as its `LayerSpec` says: norms, residual kind, attention, MLP."""

    def __init__(self, spec: C.LayerSpec, hidden: int, dtype):
        self.spec = spec

        def norm(wanted: bool):
            return Norm(spec.norm, (hidden,), (None,), dtype) if wanted else None

        pre, post = spec.norms in ("pre", "pre_post"), spec.norms in ("post", "pre_post")
        self.norm = norm(pre)
        self.mlp_norm = norm(pre and spec.residual != "parallel_shared")
        self.post_attn_norm, self.post_mlp_norm = norm(post), norm(post)
        self.attn = Attention(spec.attention, hidden, dtype, spec.quant)
        self.mlp = Mlp(spec.mlp, hidden, dtype, spec.quant)

    def __call__(self, x: jax.Array, lcs: tuple, views: tuple, shapes: tuple):
        """x: [D, B, C] (or segments laid end to end, see `Attention`) -> (x, the layer's
        updated caches, one per segment)."""

        def apply(norm, y):  # an optional norm over the feature axis
            return y if norm is None else norm(y, axis=0)

        h = apply(self.norm, x)
        attn, lcs = self.attn(h, lcs, views, shapes)
        if self.spec.residual == "sequential":
            x = x + apply(self.post_attn_norm, attn)
            return x + apply(self.post_mlp_norm, self.mlp(apply(self.mlp_norm, x))), lcs
        mlp_in = h if self.mlp_norm is None else self.mlp_norm(x, axis=0)
        return x + attn + self.mlp(mlp_in), lcs


class Decoder(nnx.Module):
    """The whole network: embedding, one `Block` per `cfg.layers` entry, final norm, output
    projection. Weights: `embed` [V, D], `layers[i]`, `final_norm`, and unless tied `lm_head`
    [V, D]; `lm_head_bias` [V] if the config says so. The matrices the config quantizes
    (`config.Quant`) are `quant.QuantizedWeight`s, read through `quant.product` like the others.

    Layers run unrolled over per-layer weight and cache buffers: XLA:CPU copies a slice of a
    stacked [L, ...] weight before a matrix product reads it, which would double the bytes a
    decode step moves; compile time grows with depth instead (the persistent compilation cache
    hides it after the first run). Activations between the products are feature-major
    ([D, tokens]) and every matrix output-major ([out, in]): on XLA:CPU with SmolLM2's shapes
    8-14% faster than [tokens, in] x [in, out] at one token and as fast or faster at 16 to 256.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = _matrix((V, D), ("vocab", "embed"), dtype, cfg.embed_quant)
        self.embed_norm = (
            None if cfg.embed_norm is None else Norm(cfg.embed_norm, (D,), (None,), dtype)
        )
        self.layers = nnx.List([Block(spec, D, dtype) for spec in cfg.layers])
        self.final_norm = Norm(cfg.final_norm, (D,), (None,), dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else _matrix((V, D), ("vocab", "embed"), dtype, cfg.lm_head_quant)
        )
        self.lm_head_bias = _param((V,), ("vocab",), dtype) if cfg.lm_head_bias else None

    @property
    def dtype(self):
        """The float dtype the network runs in (its float weights')."""
        return self.final_norm.scale[...].dtype

    def __call__(self, cache: kv.KVCache, tokens: jax.Array, valid: jax.Array):
        """Run a chunk of tokens through the model, reading and updating the cache.

        tokens: [B, C] int32; valid: [B, C] bool (False = padding: the token is skipped, its
        stream index is not consumed). Each valid query sees exactly its own window of the
        streaming contract, so a chunk gives the same result as feeding its tokens one by one.
        Returns (final hidden states [B, C, D] after the final norm, updated cache).
        """
        return self.segments(((cache, tokens, valid),))[0]

    def segments(self, parts: tuple) -> list:
        """Several batches in one pass: parts, each (cache, tokens [B, C], valid [B, C]) as
        `__call__` takes them, with their own B and C (a serving step's decode rows, one
        token each, beside prefilling rows' chunks). Every matrix product runs once over all
        their tokens, reading each weight once; attention runs per part over its own cache.
        Returns each part's (hidden [B, C, D], updated cache), as `__call__` would."""
        cfg = self.cfg
        dtype = self.dtype
        shapes = tuple(tokens.shape for _, tokens, _ in parts)
        views, xs = [], []
        for cache, tokens, valid in parts:
            valid = valid.astype(bool)
            # One view per cache layout: the full layers' sinks + ring, each native window's.
            streams = [lc.stream for lc in cache.layers]
            views.append(
                {
                    stream: _attention_view(
                        stream,
                        cache.pos,
                        valid,
                        [
                            s.attention.position
                            for s, ls in zip(cfg.layers, streams, strict=True)
                            if ls == stream
                        ],
                        _span(cache.stream),
                        dtype,
                        cache.int8,
                    )
                    for stream in dict.fromkeys(streams)
                }
            )
            xs.append(quant.take(self.embed, tokens, dtype).transpose(2, 0, 1))  # [D, B, C]
        x = _joined(xs)
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x, axis=0)
        layers = [[] for _ in parts]
        for i, block in enumerate(self.layers):
            lcs = tuple(cache.layers[i] for cache, _, _ in parts)
            seen = tuple(v[lc.stream] for v, lc in zip(views, lcs, strict=True))
            x, lcs = block(x, lcs, seen, shapes)
            for new, lc in zip(layers, lcs, strict=True):
                new.append(lc)
        out = []
        for part, new, (cache, _, valid) in zip(_split(x, shapes), layers, parts, strict=True):
            hidden = self.final_norm(part.transpose(1, 2, 0))
            fed = valid.astype(bool).sum(axis=1, dtype=jnp.int32)
            pos, epoch = kv.fold(cache, cache.pos + fed)
            out.append((hidden, cache.replace(layers=tuple(new), pos=pos, epoch=epoch)))
        return out

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits, float32, vocabulary-major: hidden [..., D] -> [V, ...].

        Vocabulary-major because XLA:CPU runs the product several times faster when the
        vocabulary is the output's major axis (SmolLM2, 16 tokens: 3.9 vs 5.5 ms; 128 tokens:
        16 vs 69 ms), so reductions over the vocabulary (sampling, log-softmax) run along axis 0.
        """
        cfg = self.cfg
        head = self.embed if self.lm_head is None else self.lm_head  # [V, D]
        hidden = jnp.moveaxis(hidden, -1, 0)  # [D, ...]
        out = quant.product(head, hidden, preferred_element_type=jnp.float32)  # [V, ...]
        if self.lm_head_bias is not None:
            bias = self.lm_head_bias[...].astype(jnp.float32)
            out = out + bias.reshape(bias.shape + (1,) * (out.ndim - 1))
        if cfg.logit_scale != 1.0:
            out = out * cfg.logit_scale
        if cfg.final_softcap is not None:
            out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
        return out


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
    """Rotate every ring key back by its row's shift of the ring base (see `jaxsink.cache`),
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


def forward(weights: nnx.State, cache: kv.KVCache, tokens, valid, graphdef: nnx.GraphDef):
    """`Decoder.__call__` as a pure function of the weights' state: -> (hidden [B, C, D],
    cache)."""
    return nnx.merge(graphdef, weights)(cache, tokens, valid)


def logits(weights: nnx.State, hidden: jax.Array, graphdef: nnx.GraphDef) -> jax.Array:
    """`Decoder.logits` as a pure function: hidden [..., D] -> float32 [V, ...]."""
    return nnx.merge(graphdef, weights).logits(hidden)


def _step(weights, cache, tokens, valid, graphdef):
    TRACES["step"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)
    return jnp.moveaxis(module.logits(hidden), 0, -1), cache


step = EntryPoint(
    _step,
    static=("graphdef",),
    donate=("cache",),
    doc="""Jitted `(weights, cache, tokens [B, C], valid [B, C], graphdef) -> (logits
[B, C, V] float32, cache)`: `weights`, `graphdef` from `nnx.split(Decoder)` (`Model.weights`,
`Model.graphdef`).

The cache is donated (updated in place): do not reuse the cache passed in.
""",
)


def _last_logits(weights, cache, tokens, valid, graphdef):
    TRACES["last_logits"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)
    return module.logits(last_valid(hidden, valid)).T, cache


def last_valid(hidden: jax.Array, valid: jax.Array) -> jax.Array:
    """Each row's hidden state at its last valid token: hidden [B, C, D], valid [B, C] ->
    [B, D] (the first position for a row with none)."""
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


last_logits = EntryPoint(
    _last_logits,
    static=("graphdef",),
    donate=("cache",),
    doc="""Jitted prefill chunk: like `step`, but only the logits of each row's last
valid token ([B, V]), which skips the vocabulary projection of every other position.""",
)


def abstract(cfg: ModelConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, weights state of `jax.ShapeDtypeStruct`s) of `Decoder(cfg)`, allocating
    nothing: the shapes and logical axes every checkpoint and conversion follow."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, dtype)))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's name (its path in the module, dot-joined, e.g. `layers.0.attn.qkv`, or
    `layers.0.attn.qkv.codes` for a part of a quantized one) and shape in memory, derived from
    the module itself."""
    _, state = abstract(cfg)
    return {_name(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def checkpoint_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """Every weight's checkpoint name, its shape in the checkpoint and its dtype there: None
    for a float weight (kept in the checkpoint's float dtype), the `quant.Stored` dtype for a
    part of a quantized one (whose shape there may differ: 4-bit codes two per byte)."""
    _, state = abstract(cfg)
    layout = {}
    for path, v in nnx.to_flat_state(state):
        stored = v.get_metadata().get("stored")
        shape = tuple(v.shape)
        layout[_name(path)] = (
            (shape, None) if stored is None else (stored.shape(shape), np.dtype(stored.dtype))
        )
    return layout


def _name(path) -> str:
    return ".".join(map(str, path))


def from_stored(var: nnx.Variable, array: np.ndarray, dtype) -> np.ndarray:
    """A checkpoint array (or a shard of it) in the memory form of weight `var` (abstract):
    a float weight cast to `dtype`, a part of a quantized one decoded (`quant.Stored`)."""
    stored = var.get_metadata().get("stored")
    if stored is None:
        return array.astype(dtype, copy=False)
    return stored.decode(array, var.get_value().dtype)


def from_flat(
    cfg: ModelConfig, flat: dict[str, np.ndarray], dtype
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, weights) of `Decoder(cfg)` holding the checkpoint arrays `flat` (names of
    `checkpoint_layout`), each its own device buffer, float weights cast to `dtype`."""
    graphdef, state = abstract(cfg, dtype)
    flat_state = nnx.to_flat_state(state)
    for path, var in flat_state:
        var.set_value(jnp.asarray(from_stored(var, np.asarray(flat[_name(path)]), dtype)))
    return graphdef, nnx.from_flat_state(flat_state)


def param_bytes(weights) -> int:
    """Total bytes of a weights pytree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(weights))
