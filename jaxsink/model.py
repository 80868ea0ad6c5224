"""One generic decoder block, scanned over stacked layers, reading and writing the sink + ring cache.

`forward(params, cache, tokens, valid, cfg)` is a pure function of explicit pytrees. Static (a
change recompiles): `cfg`, `cache.stream` and every shape (batch B, chunk length C, capacity K).
Everything that moves with the stream (`cache.pos`, the tokens, which of them are valid) is an
array, so one compilation serves a stream of any length.

Letters in shape comments and einsum strings: B batch, C chunk (queries), S cache slots (keys:
the sink slots, the ring slots or both, as each comment says), W ring slots, J chunk keys, D hidden, N query heads, K kv heads, G query heads per kv head, H head dim,
F mlp, V vocab (or, next to query tensors, the query rotation variants: see `jaxsink.cache`).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from jaxsink import cache as kv
from jaxsink.config import ModelConfig

Params = dict  # {"embed", "final_norm", ["lm_head"], "layers": {name: [L, ...]}}

# Python-side trace counter: jit traces once per compilation, so this counts compilations of
# the model's jitted entry points (tests assert on it).
TRACES: collections.Counter = collections.Counter()

_MASKED = -1e30  # finite, so a row with nothing visible (padding) gives no NaN


def unflatten(flat: dict[str, jax.Array]) -> Params:
    """Checkpoint names (`layers.wq`) -> the nested params pytree."""
    params: Params = {"layers": {}}
    for name, value in flat.items():
        if name.startswith("layers."):
            params["layers"][name.removeprefix("layers.")] = value
        else:
            params[name] = value
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype (as HF Llama). x: [..., D]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rotate(x: jax.Array, pos: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Apply RoPE at integer positions. x: [..., H], pos: x.shape[:-2] (one per row of heads)."""
    inv_freq = jnp.asarray(cfg.inv_freq())  # [R/2]
    angles = pos.astype(jnp.float32)[..., None, None] * inv_freq  # [..., 1, R/2]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rot, rest = x[..., : cfg.rotated_dim], x[..., cfg.rotated_dim :]
    if cfg.rotary_interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = jnp.split(rot, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


def _select_variant(scores: jax.Array, variant: jax.Array) -> jax.Array:
    """scores [B, C, V, K, G, T], variant [B, C, T] -> the chosen variant's scores [B, C, K, G, T]."""
    out = scores[:, :, 0]
    for v in range(1, scores.shape[2]):
        out = jnp.where((variant == v)[:, :, None, None, :], scores[:, :, v], out)
    return out


def _attention_view(cache: kv.KVCache, valid: jax.Array):
    """Everything about *which* keys each query sees, shared by all layers.

    Returns the masks/variants against the cached slots (sinks, then ring) [B, C, S] and
    against the chunk's own keys [B, C, J], the query rotations [B, C, V], the key rotations
    [B, C] and the slot each chunk token is written to ([B, C], K = dropped).
    """
    stream = cache.stream
    S, W = stream.sinks, stream.window
    t = cache.pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, C]
    pos_after = cache.pos + valid.sum(axis=1, dtype=jnp.int32)  # [B]
    cached = kv.slot_tokens(stream, cache.pos)  # [B, S]: sink slots, then ring slots
    chunk = jnp.where(valid, t, -1)  # [B, J]
    tq = t[:, :, None]
    view = {
        "see_cached": kv.visible(stream, tq, cached[:, None, :]),
        "var_cached": kv.query_variant(stream, tq, cached[:, None, :]),
        "see_chunk": kv.visible(stream, tq, chunk[:, None, :]),
        "var_chunk": kv.query_variant(stream, tq, chunk[:, None, :]),
        "q_rot": kv.query_rotations(stream, t)[..., : len(kv.used_variants(stream))],
        "k_rot": kv.key_rotation(stream, t),
    }
    # A chunk token is written unless a later token of the same chunk takes its ring slot.
    kept = valid & ((t < S) | (t >= pos_after[:, None] - W))
    view["write_slot"] = jnp.where(kept, kv.slot_of(stream, t), stream.capacity)
    return view


def _attention(lp, h, cached, view, cfg: ModelConfig):
    """Self-attention of a chunk over the cached sink and ring slots plus its own keys.

    h: [B, C, D]; cached: this layer's sink_k, sink_v [B, K, n_sinks, H], ring_k, ring_v
    [B, K, W, H].
    Returns (out [B, C, D], new keys [B, C, K, H] rotated for caching, new values [B, C, K, H]).
    """
    sink_k, sink_v, ring_k, ring_v = cached
    B, C, _ = h.shape
    K, H = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K
    n_sinks = sink_k.shape[2]
    q = jnp.einsum("bcd,dnh->bcnh", h, lp["wq"])
    k = jnp.einsum("bcd,dkh->bckh", h, lp["wk"])
    v = jnp.einsum("bcd,dkh->bckh", h, lp["wv"])
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    k = rotate(k, view["k_rot"], cfg)  # [B, C, K, H]
    n_var = view["q_rot"].shape[-1]
    q = rotate(jnp.broadcast_to(q[:, :, None], (B, C, n_var, *q.shape[2:])), view["q_rot"], cfg)
    q = (q * jnp.asarray(H**-0.5, q.dtype)).reshape(B, C, n_var, K, G, H)

    # Sink slots only ever need the SINK variant; ring slots only the ring variants.
    f32 = jnp.float32
    n_ring = min(n_var, kv.SINK)
    s_ring = jnp.einsum("bcvkgh,bksh->bcvkgs", q[:, :, :n_ring], ring_k, preferred_element_type=f32)
    scores = [_select_variant(s_ring, view["var_cached"][..., n_sinks:])]  # [B, C, K, G, W]
    values = [ring_v]
    if n_sinks:
        q_sink = q[:, :, kv.SINK]
        scores.insert(
            0, jnp.einsum("bckgh,bksh->bckgs", q_sink, sink_k, preferred_element_type=f32)
        )
        values.insert(0, sink_v)
    s_chunk = jnp.einsum("bcvkgh,bjkh->bcvkgj", q, k, preferred_element_type=f32)
    scores.append(_select_variant(s_chunk, view["var_chunk"]))  # [B, C, K, G, J]
    seen = jnp.concatenate([view["see_cached"], view["see_chunk"]], axis=-1)  # [B, C, S + J]
    scores = jnp.where(seen[:, :, None, None, :], jnp.concatenate(scores, axis=-1), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bckgj,bjkh->bckgh", probs[..., -C:], v)
    start = 0
    for cached_v in values:
        n = cached_v.shape[2]
        out += jnp.einsum("bckgs,bksh->bckgh", probs[..., start : start + n], cached_v)
        start += n
    out = jnp.einsum("bcnh,nhd->bcd", out.reshape(B, C, K * G, H), lp["wo"])
    if cfg.out_bias:
        out += lp["bo"]
    return out, k, v


def _mlp(lp, h, cfg: ModelConfig):
    """Gated MLP. h: [B, C, D] -> [B, C, D]."""
    gate = jnp.einsum("bcd,df->bcf", h, lp["w_gate"])
    up = jnp.einsum("bcd,df->bcf", h, lp["w_up"])
    if cfg.mlp_bias:
        gate, up = gate + lp["b_gate"], up + lp["b_up"]
    out = jnp.einsum("bcf,fd->bcd", _activation(cfg.hidden_act)(gate) * up, lp["w_down"])
    return out + lp["b_down"] if cfg.mlp_bias else out


def forward(
    params: Params, cache: kv.KVCache, tokens: jax.Array, valid: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, kv.KVCache]:
    """Run a chunk of tokens through the model, reading and updating the cache.

    tokens: [B, C] int32; valid: [B, C] bool (False = padding: the token is skipped, its stream
    index is not consumed). Each valid query sees exactly its own SPEC window, so a chunk gives
    the same result as feeding its tokens one by one.
    Returns (final hidden states [B, C, D] after the final norm, updated cache).
    """
    valid = valid.astype(bool)
    view = _attention_view(cache, valid)
    x = params["embed"][tokens]  # [B, C, D]

    def layer(x, xs):
        lp, *cached = xs  # this layer's weights and cache
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        attn, k, v = _attention(lp, h, cached, view, cfg)
        x = x + attn
        x = x + _mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), cfg)
        return x, (k, v)

    # The cache is only read inside the scan; every layer's new keys/values are written after
    # it, in place (writing inside the loop makes XLA copy the whole cache).
    c = cache
    xs = (params["layers"], c.sink_k, c.sink_v, c.ring_k, c.ring_v)
    x, (k_new, v_new) = jax.lax.scan(layer, x, xs)
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    return x, _write(cache, k_new, v_new, view["write_slot"], valid)


def _write(cache: kv.KVCache, k_new, v_new, write_slot, valid) -> kv.KVCache:
    """Store a chunk's keys/values [L, B, C, K, H] at `write_slot` [B, C] (sinks then ring;
    S + W = dropped)."""
    S, W = cache.stream.sinks, cache.stream.window
    rows = jnp.arange(write_slot.shape[0])[:, None]  # [B, 1]
    # Indexing [:, rows, :, slot] puts the [B, C] index axes first: updates are [B, C, L, K, H].
    k_new, v_new = jnp.moveaxis(k_new, 0, 2), jnp.moveaxis(v_new, 0, 2)

    def put(arr, slot, new):
        return arr.at[:, rows, :, slot].set(new, mode="drop")  # out-of-range slots are dropped

    ring_slot = jnp.where(write_slot >= S, write_slot - S, W)  # W (dropped) for sinks
    out = {
        "ring_k": put(cache.ring_k, ring_slot, k_new),
        "ring_v": put(cache.ring_v, ring_slot, v_new),
        "pos": cache.pos + valid.sum(axis=1, dtype=jnp.int32),
    }
    if S:
        sink_slot = jnp.minimum(write_slot, S)  # S (dropped) for ring tokens
        out |= {
            "sink_k": put(cache.sink_k, sink_slot, k_new),
            "sink_v": put(cache.sink_v, sink_slot, v_new),
        }
    return cache.replace(**out)


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Next-token logits, float32. hidden: [..., D] -> [..., V]."""
    if cfg.tie_embeddings:
        return jnp.einsum(
            "...d,vd->...v", hidden, params["embed"], preferred_element_type=jnp.float32
        )
    return jnp.einsum(
        "...d,dv->...v", hidden, params["lm_head"], preferred_element_type=jnp.float32
    )


def _step(params, cache, tokens, valid, cfg):
    TRACES["step"] += 1
    hidden, cache = forward(params, cache, tokens, valid, cfg)
    return logits(params, hidden, cfg), cache


step = jax.jit(_step, static_argnames=("cfg",), donate_argnames=("cache",))
step.__doc__ = """Jitted `(params, cache, tokens [B, C], valid [B, C]) -> (logits [B, C, V], cache)`.

The cache is donated (updated in place): do not reuse the cache passed in.
"""


def _last_logits(params, cache, tokens, valid, cfg):
    TRACES["last_logits"] += 1
    hidden, cache = forward(params, cache, tokens, valid, cfg)
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B]
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return logits(params, h, cfg), cache


last_logits = jax.jit(_last_logits, static_argnames=("cfg",), donate_argnames=("cache",))
last_logits.__doc__ = """Jitted prefill chunk: like `step`, but only the logits of each row's last
valid token ([B, V]), which skips the vocabulary projection of every other position."""


def param_bytes(params: Params) -> int:
    """Total bytes of a params pytree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
