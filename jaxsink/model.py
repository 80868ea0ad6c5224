"""One generic decoder block, unrolled over per-layer buffers, reading and writing the sink +
ring cache.

`forward(params, cache, tokens, valid, cfg)` is a pure function of explicit pytrees. Static (a
change recompiles): `cfg`, `cache.stream` and every shape (batch B, chunk length C, capacity K).
Everything that moves with the stream (`cache.pos`, the tokens, which of them are valid) is an
array, so one compilation serves a stream of any length.

Letters in shape comments and einsum strings: B batch, C chunk (queries), S cache slots (keys:
the sink slots, the ring slots or both, as each comment says), W ring slots, J chunk keys,
D hidden, N query heads, K kv heads, G query heads per kv head, H head dim, F mlp, V vocab (or,
next to query tensors, the query rotation variants: see `jaxsink.cache`), P rotary positions.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxsink import cache as kv
from jaxsink.config import ModelConfig

Params = dict  # {"embed", "final_norm", ["lm_head"], "layers": ({name: array}, ...) per layer}

# Python-side trace counter: jit traces once per compilation, so this counts compilations of
# the model's jitted entry points (tests assert on it).
TRACES: collections.Counter = collections.Counter()

_MASKED = -1e30  # finite, so a row with nothing visible (padding) gives no NaN
# Batch rows x kv heads from which a group's attention runs as one fused multi-threaded kernel
# on XLA:CPU (`_group`); below it the plain form is faster (measured on 2 cores).
_FUSED_MIN_PAIRS = 12


def unflatten(flat: Mapping[str, np.ndarray | jax.Array], dtype=None) -> Params:
    """Checkpoint arrays (`embed`, stacked `layers.wq` [L, ...], ...) -> the params pytree on
    device, cast to `dtype` (default: kept), in the layout the model runs on:

    - each layer its own buffers: XLA:CPU copies a slice of a stacked [L, ...] weight before a
      matrix product reads it, which would double the bytes a decode step moves;
    - q/k/v fused per kv head, `w_qkv` [K, G + 2, H, D] (the G query heads of kv head k, then
      its key and its value), and gate/up fused, `w_gate_up` [2, F, D]: one larger matrix
      product each, faster than three or two small ones, and still split along kv heads / F
      for sharding;
    - every matrix output-major as stored ([out, in]), multiplying feature-major activations
      ([in, tokens], see `forward`). On XLA:CPU with SmolLM2's shapes this is 8-14% faster
      than [tokens, in] x [in, out] at one token and as fast or faster at 16 to 256 tokens
      (a decode step: 16.1 -> 13.5 ms); [tokens, in] x [out, in] is fast at one token only
      (15-60% slower at 16).
    """
    params: Params = {}
    stacked = {}
    for name, value in flat.items():
        if name.startswith("layers."):
            stacked[name.removeprefix("layers.")] = np.asarray(value)
        else:
            params[name] = jnp.asarray(value, dtype)
    n_layers = {w.shape[0] for w in stacked.values()}
    if len(n_layers) > 1:
        raise ValueError(f"stacked layer weights disagree on the layer count: {sorted(n_layers)}")
    params["layers"] = tuple(
        {
            name: jnp.asarray(w, dtype)
            for name, w in _fuse_layer({n: w[i] for n, w in stacked.items()}).items()
        }
        for i in range(max(n_layers, default=0))
    )
    return params


def _fuse_layer(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's checkpoint weights (`wq` [N, H, D], `wk`, `wv` [K, H, D], `w_gate`, `w_up`
    [F, D], biases alike) -> the fused runtime layout of `unflatten`."""
    N, H, D = w["wq"].shape
    K = w["wk"].shape[0]
    out = {n: w.pop(n) for n in ("attn_norm", "mlp_norm", "wo", "w_down", "bo", "b_down") if n in w}
    qkv = [w.pop("wq").reshape(K, N // K, H, D), w.pop("wk")[:, None], w.pop("wv")[:, None]]
    out["w_qkv"] = np.concatenate(qkv, axis=1)
    out["w_gate_up"] = np.stack([w.pop("w_gate"), w.pop("w_up")])
    if "bq" in w:
        out["b_qkv"] = np.concatenate(
            [w.pop("bq").reshape(K, N // K, H), w.pop("bk")[:, None], w.pop("bv")[:, None]], axis=1
        )
    if "b_gate" in w:
        out["b_gate_up"] = np.stack([w.pop("b_gate"), w.pop("b_up")], axis=0)
    if w:
        raise ValueError(f"unexpected layer weights: {sorted(w)}")
    return out


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype (as HF Llama), over `axis` (D):
    x [..., D] by default; weight [D], broadcast along `axis`."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    return weight.reshape(shape) * x32.astype(x.dtype)


def rotary_table(n_positions: int, cfg: ModelConfig) -> np.ndarray:
    """cos and sin of the RoPE angles at positions 0 .. P-1: [P, 2, R/2] float32.

    Made on the host (the angles in float32, as Hugging Face computes them, their cos/sin in
    float64) and read by index on device: computed there, XLA would evaluate cos/sin again
    inside every layer's rotation, for every head.
    """
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * cfg.inv_freq()  # [P, R/2]
    angles = angles.astype(np.float64)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def rotary(table: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin at integer positions: table [P, 2, R/2], pos [...] -> two [..., 1, R/2]."""
    cos_sin = table[pos]  # [..., 2, R/2]
    return cos_sin[..., :1, :], cos_sin[..., 1:, :]


def rotate(
    x: jax.Array, cos_sin: tuple[jax.Array, jax.Array], cfg: ModelConfig, axis: int = -1
) -> jax.Array:
    """Apply RoPE along `axis`, the head dim (default last: x [..., N, H]). cos_sin: `rotary`
    of one position per row of heads, broadcasting against x with R/2 along `axis`."""
    cos, sin = cos_sin
    axis, R = axis % x.ndim, cfg.rotated_dim
    rest = jax.lax.slice_in_dim(x, R, x.shape[axis], axis=axis)
    if cfg.rotary_interleaved:
        x1 = jax.lax.slice_in_dim(x, 0, R, 2, axis=axis)
        x2 = jax.lax.slice_in_dim(x, 1, R, 2, axis=axis)
        pairs = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis + 1)
        out = pairs.reshape(*x.shape[:axis], R, *x.shape[axis + 1 :])
    else:
        x1 = jax.lax.slice_in_dim(x, 0, R // 2, axis=axis)
        x2 = jax.lax.slice_in_dim(x, R // 2, R, axis=axis)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)
    return jnp.concatenate([out, rest], axis=axis) if rest.shape[axis] else out


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


def _select_variant(scores: jax.Array, variant: jax.Array) -> jax.Array:
    """scores [B, K, C, V, G, T], variant [B, 1, T] -> each key's variant's scores
    [B, K, C, G, T]."""
    out = scores[:, :, :, 0]
    for v in range(1, scores.shape[3]):
        out = jnp.where((variant == v)[:, None, :, None, :], scores[:, :, :, v], out)
    return out


def _attention_view(cache: kv.KVCache, valid: jax.Array, cfg: ModelConfig, dtype):
    """Everything about *which* keys each query sees, shared by all layers.

    Returns the masks against the cached slots (sinks, then ring) [B, C, S] and against the
    chunk's own keys [B, C, J], the variant scoring each chunk key [B, 1, J], the query
    rotations (`rotary` of [B, C, V]), the key rotations (`rotary` of [B, C]), the slot each
    chunk token is written to ([B, C], K = dropped), the ring rebase after the write (None for
    a cache that never wraps, else (whether any row moves to a later lap [] bool, `rotary` of
    each row's shift [B])), whether each dense ring block holds a visible key ([] bool; None for
    blocks always attended) and, static, the cache blocks ((first slot, slots) each) and sink
    count.
    """
    stream = cache.stream
    S, W = stream.sinks, stream.window
    C = valid.shape[1]
    t = cache.pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, C]
    pos_after = cache.pos + valid.sum(axis=1, dtype=jnp.int32)  # [B]
    base = kv.ring_base(stream, cache.pos)  # [B]
    cached = kv.slot_tokens(stream, cache.pos)  # [B, S]: sink slots, then ring slots
    chunk = jnp.where(valid, t, -1)  # [B, J]
    tq = t[:, :, None]
    table = jnp.asarray(rotary_table(kv.rotation_count(stream, C), cfg), dtype)  # [P, 2, R/2]
    n_variants = len(kv.used_variants(stream))
    view = {
        "see_cached": kv.visible(stream, tq, cached[:, None, :]),
        "see_chunk": kv.visible(stream, tq, chunk[:, None, :]),
        "var_chunk": kv.query_variant(stream, chunk[:, None, :]),
        "q_rot": rotary(table, kv.query_rotations(stream, t, base[:, None])[..., :n_variants]),
        "k_rot": rotary(table, kv.key_rotation(stream, t, base[:, None])),
        "rebase": None,
    }
    if stream.wraps:
        shift = kv.ring_base(stream, pos_after) - base  # [B], a multiple of W
        view["rebase"] = (shift.max() > 0, rotary(table, shift))
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
    return view


def _group(q, keys, values, variant, seen):
    """Attention of the queries over one group of keys, as partial softmax statistics.

    q: [B, K, C, V', G, H] (the variants this group can need); keys [B, K, H, T]; values
    [B, K, T, H]; variant: [B, 1, T] index into V' (None: V' = 1); seen: [B, C, T].
    Returns (peak [B, K, C, G, 1] the row max, mass [B, K, C, G, 1] the sum of exp(score -
    peak), weighted [B, K, C, G, H] float32 the exp-weighted values); `_combine` merges groups.
    """
    f32 = jnp.float32
    B, K, C, V, G, H = q.shape
    T = keys.shape[-1]
    rows = q.reshape(B, K, C * V * G, H)  # one [rows, H] x [H, T] product per (b, kv head)
    scores = jnp.einsum("bkrh,bkht->bkrt", rows, keys, preferred_element_type=f32)
    if variant is None and B * K >= _FUSED_MIN_PAIRS:
        # XLA:CPU fuses product, mask, max and exp into one kernel that runs on every core,
        # but only if the max has no other use: the peak is recovered outside the kernel as
        # the score of the key with the largest weight, one [H] product per row.
        visible = jnp.broadcast_to(seen[:, None, :, None, :], (B, 1, C, G, T))
        visible = visible.reshape(B, 1, C * G, T)
        scores = scores + jnp.where(visible, 0.0, _MASKED)
        weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # [B, K, R, T]
        top = weights.max(axis=-1, keepdims=True)
        first = jnp.min(jnp.where(weights == top, jnp.arange(T), T), axis=-1)  # [B, K, R]
        first = jnp.minimum(first, T - 1)[:, :, None, :]  # [B, K, 1, R]
        best = jnp.take_along_axis(keys, first, axis=-1)  # [B, K, H, R]
        peak = jnp.einsum("bkrh,bkhr->bkr", rows, best, preferred_element_type=f32)
        peak = jnp.where(visible.any(axis=-1), peak, _MASKED).reshape(B, K, C, G, 1)
        weights = weights.reshape(B, K, C, G, T)
    else:
        scores = scores.reshape(B, K, C, V, G, T)
        scores = scores[:, :, :, 0] if variant is None else _select_variant(scores, variant)
        scores = jnp.where(seen[:, None, :, None, :], scores, _MASKED)  # [B, K, C, G, T]
        peak = scores.max(axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
    weighted = jnp.einsum(
        "bkcgs,bksh->bkcgh", weights.astype(values.dtype), values, preferred_element_type=f32
    )
    return peak, weights.sum(axis=-1, keepdims=True), weighted


def _skipped_group(q, *_):
    """`_group`'s result for keys no query sees: no mass."""
    B, K, C, _, G, H = q.shape
    zeros = jnp.zeros((B, K, C, G, 1), jnp.float32)
    return zeros + _MASKED, zeros, jnp.zeros((B, K, C, G, H), jnp.float32)


def _combine(parts):
    """Merge `_group` results into the softmax-weighted values [B, K, C, G, H] float32."""
    top = functools.reduce(jnp.maximum, [peak for peak, _, _ in parts])
    scales = [jnp.exp(peak - top) for peak, _, _ in parts]
    total = sum(mass * c for (_, mass, _), c in zip(parts, scales, strict=True))
    return sum(weighted * c for (_, _, weighted), c in zip(parts, scales, strict=True)) / total


def _attention(lp, h, lc: kv.LayerCache, view, cfg: ModelConfig):
    """Self-attention of a chunk over one layer's cached sink and ring slots plus its own keys,
    then the chunk's surviving keys/values written into that layer's cache.

    h: [D, B, C] (feature-major, see `forward`); lc: this layer's cache, one key [B, K, H, n]
    and value [B, K, n, H] buffer per block of n slots (`view["blocks"]`).
    Returns (out [D, B, C], the updated layer cache).
    Intermediates keep (batch, kv head) leading, like the cache, so every score and value
    product is one batched matrix product over B * K.
    """
    _, B, C = h.shape
    K, H = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K
    qkv = jnp.einsum("kehd,dbc->kehbc", lp["w_qkv"], h)  # [K, G + 2, H, B, C]
    if cfg.qkv_bias:
        qkv += lp["b_qkv"][..., None, None]
    qkv = qkv.transpose(3, 4, 0, 1, 2)  # [B, C, K, G + 2, H]
    q = qkv[:, :, :, :G].reshape(B, C, K * G, H)
    k = rotate(qkv[:, :, :, G], view["k_rot"], cfg)  # [B, C, K, H]
    v = qkv[:, :, :, G + 1]  # [B, C, K, H]
    n_var = view["q_rot"][0].shape[2]
    q = rotate(jnp.broadcast_to(q[:, :, None], (B, C, n_var, K * G, H)), view["q_rot"], cfg)
    q = (q * jnp.asarray(H**-0.5, q.dtype)).reshape(B, C, n_var, K, G, H)
    q = q.transpose(0, 3, 1, 2, 4, 5)  # [B, K, C, V, G, H]

    # Groups of keys, each scored by the query variants it can need: the sink block with the
    # chunk's own keys (SINK or RING per key; small, so one group saves a group's fixed costs),
    # then each ring block (RING). A dense cache's block that no query of the chunk can see yet
    # is skipped at run time.
    small_keys, small_values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    seen, variant = view["see_chunk"], view["var_chunk"]
    blocks = list(zip(view["blocks"], view["live"], lc.keys, lc.values, strict=True))
    if view["n_sinks"]:
        (_, n), _, sink_keys, sink_values = blocks.pop(0)
        small_keys = jnp.concatenate([sink_keys, small_keys], axis=-1)
        small_values = jnp.concatenate([sink_values, small_values], axis=-2)
        seen = jnp.concatenate([view["see_cached"][..., :n], seen], axis=-1)
        variant = jnp.concatenate([jnp.full((B, 1, n), kv.SINK, variant.dtype), variant], -1)
    parts = [_group(q, small_keys, small_values, variant, seen)]
    for (start, n), live, keys, values in blocks:
        seen = view["see_cached"][..., start : start + n]  # [B, C, n]
        args = (q[:, :, :, kv.RING : kv.RING + 1], keys, values, None, seen)
        parts.append(
            _group(*args) if live is None else jax.lax.cond(live, _group, _skipped_group, *args)
        )
    out = _combine(parts).astype(v.dtype)  # [B, K, C, G, H]
    # The written keys/values are made to depend on `out`, which read the whole old cache: only
    # a data dependence lets XLA prove the write comes after the reads and do it in place
    # (an optimization_barrier does not); otherwise it copies every cache buffer twice.
    after_reads = out.reshape(-1)[0] * 0
    k, v = k + after_reads, v + after_reads
    out = out.transpose(1, 3, 4, 0, 2).reshape(K * G * H, B, C)
    out = jnp.einsum("dn,nbc->dbc", lp["wo"].reshape(-1, K * G * H), out)  # [D, B, C]
    if cfg.out_bias:
        out += lp["bo"][:, None, None]
    lc = _write(lc, k, v, view["write_slot"], view["blocks"])
    return out, _rebase(lc, view["rebase"], view["blocks"], view["n_sinks"], cfg)


def _mlp(lp, h, cfg: ModelConfig):
    """Gated MLP, feature-major. h: [D, B, C] -> [D, B, C]."""
    gate_up = jnp.einsum("tfd,dbc->tfbc", lp["w_gate_up"], h)  # [2, F, B, C]
    if cfg.mlp_bias:
        gate_up += lp["b_gate_up"][..., None, None]
    hidden = _activation(cfg.hidden_act)(gate_up[0]) * gate_up[1]  # [F, B, C]
    out = jnp.einsum("df,fbc->dbc", lp["w_down"], hidden)
    return out + lp["b_down"][:, None, None] if cfg.mlp_bias else out


def forward(
    params: Params, cache: kv.KVCache, tokens: jax.Array, valid: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, kv.KVCache]:
    """Run a chunk of tokens through the model, reading and updating the cache.

    tokens: [B, C] int32; valid: [B, C] bool (False = padding: the token is skipped, its stream
    index is not consumed). Each valid query sees exactly its own SPEC window, so a chunk gives
    the same result as feeding its tokens one by one.
    Returns (final hidden states [B, C, D] after the final norm, updated cache).

    Layers run unrolled over per-layer weight and cache buffers (see `unflatten`): compile time
    grows with depth, but no step copies a layer's weights or cache.
    """
    valid = valid.astype(bool)
    view = _attention_view(cache, valid, cfg, params["embed"].dtype)
    x = params["embed"][tokens].transpose(2, 0, 1)  # [D, B, C]
    new_layers = []
    for lp, lc in zip(params["layers"], cache.layers, strict=True):
        attn, lc = _attention(lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps, 0), lc, view, cfg)
        x = x + attn
        x = x + _mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps, 0), cfg)
        new_layers.append(lc)
    x = rms_norm(x.transpose(1, 2, 0), params["final_norm"], cfg.norm_eps)
    pos = cache.pos + valid.sum(axis=1, dtype=jnp.int32)
    return x, cache.replace(layers=tuple(new_layers), pos=pos)


def _write(lc: kv.LayerCache, k_new, v_new, write_slot, blocks) -> kv.LayerCache:
    """Store a chunk's keys/values [B, C, K, H] at `write_slot` [B, C] (cache slots, sinks then
    ring; K = dropped) into the blocks holding them, in place once attention has read the old
    contents. blocks: (first slot, slots) of each block."""
    rows = jnp.arange(write_slot.shape[0])[:, None]  # [B, 1]
    keys, values = [], []
    for (start, n), kb, vb in zip(blocks, lc.keys, lc.values, strict=True):
        inside = (write_slot >= start) & (write_slot < start + n)
        slot = jnp.where(inside, write_slot - start, n)  # n: dropped
        # Indexing [rows, ..., slot] puts the [B, C] index axes first: updates are [B, C, K, H].
        keys.append(kb.at[rows, :, :, slot].set(k_new, mode="drop"))
        values.append(vb.at[rows, :, slot].set(v_new, mode="drop"))
    return kv.LayerCache(keys=tuple(keys), values=tuple(values))


def _rebase(lc: kv.LayerCache, rebase, blocks, n_sinks: int, cfg: ModelConfig) -> kv.LayerCache:
    """Rotate every ring key back by its row's shift of the ring base (see `jaxsink.cache`),
    at run time only when some row's chunk entered a later lap (once per W tokens).
    rebase: `view["rebase"]`, None for a cache that never wraps."""
    if rebase is None:
        return lc
    moved, (cos, sin) = rebase  # cos, sin [B, 1, R/2]
    back = (cos[..., None], -sin[..., None])  # [B, 1, R/2, 1]: rotation by -shift

    def rotate_back(keys):  # [B, K, H, n]
        return rotate(keys, back, cfg, axis=2)

    keys = tuple(
        kb if start < n_sinks else jax.lax.cond(moved, rotate_back, lambda x: x, kb)
        for (start, _), kb in zip(blocks, lc.keys, strict=True)
    )
    return lc.replace(keys=keys)


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Next-token logits, float32, vocabulary-major: hidden [..., D] -> [V, ...].

    Vocabulary-major because XLA:CPU runs the product several times faster when the vocabulary
    is the output's major axis (SmolLM2, 16 tokens: 3.9 vs 5.5 ms; 128 tokens: 16 vs 69 ms),
    so reductions over the vocabulary (sampling, log-softmax) run along axis 0.
    """
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]  # [V, D]
    return jnp.einsum("vd,...d->v...", head, hidden, preferred_element_type=jnp.float32)


def _step(params, cache, tokens, valid, cfg):
    TRACES["step"] += 1
    hidden, cache = forward(params, cache, tokens, valid, cfg)
    return jnp.moveaxis(logits(params, hidden, cfg), 0, -1), cache


step = jax.jit(_step, static_argnames=("cfg",), donate_argnames=("cache",))
step.__doc__ = """Jitted `(params, cache, tokens [B, C], valid [B, C]) -> (logits [B, C, V], cache)`.

The cache is donated (updated in place): do not reuse the cache passed in.
"""


def _last_logits(params, cache, tokens, valid, cfg):
    TRACES["last_logits"] += 1
    hidden, cache = forward(params, cache, tokens, valid, cfg)
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B]
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return logits(params, h, cfg).T, cache


last_logits = jax.jit(_last_logits, static_argnames=("cfg",), donate_argnames=("cache",))
last_logits.__doc__ = """Jitted prefill chunk: like `step`, but only the logits of each row's last
valid token ([B, V]), which skips the vocabulary projection of every other position."""


def param_bytes(params: Params) -> int:
    """Total bytes of a params pytree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
