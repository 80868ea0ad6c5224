"""The fixed-shape sink + ring KV cache and the SPEC index arithmetic over it.

Slots `0 .. S-1` hold the first S tokens of the stream (sinks) forever; slots `S .. S+W-1` are a
ring: stream token k >= S lives in slot `S + (k - S) mod W` until token k + W replaces it. Each
batch row is its own stream with its own position `pos[b]` (tokens consumed so far).

Keys are cached *rotated by a small in-cache position*, never by the stream index:
  - sink k (k < S):   rotated by k,
  - ring token k:     rotated by its ring index r(k) = (k - S) mod W.
A query at stream index t scores a key with one of three rotations of itself ("variants"):
  - RING_SAME: key in the same lap of the ring, lap(x) = (x - S) // W: query rotated by r(t),
  - RING_PREV: key one lap behind:                                     query rotated by r(t) + W,
  - SINK:      key is a sink:                                          query rotated by min(t, K),
so every score sees exactly the SPEC distance d(t, k) (t - k for recent keys, min(t, K) - k for
sinks) and every angle is below 2W: nothing depends on t in floating point. A visible recent key
is never more than one lap behind its query because t - k <= W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsink.config import ModelConfig, StreamConfig

RING_SAME, RING_PREV, SINK = 0, 1, 2


@struct.dataclass
class LayerCache:
    """One layer's keys/values for every stream in the batch (keys rotated as in the module
    docstring): its K = S + W slots, sinks then ring, stored as consecutive blocks (see
    `slot_blocks`), each its own buffers, so attention reads a block without slicing a copy and
    skips a block no query can see. Keys are stored transposed, the layout the score product
    reads without a transposing copy.

    keys: one [B, Hkv, H, n] per block; values: one [B, Hkv, n, H] per block (n slots each).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


@struct.dataclass
class KVCache:
    """Every layer's sink and ring slots, and the stream position of every batch row.

    layers: one `LayerCache` per layer, each its own buffers: a layer reads and updates its
      cache in place, where slicing one stacked [L, ...] array would copy it.
    pos:  [B] int32, tokens consumed so far by each row (the stream index of its next token).
    stream: static: which tokens are kept. Changing it recompiles.
    """

    layers: tuple[LayerCache, ...]
    pos: jax.Array
    stream: StreamConfig = struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


RING_BLOCK = 1024  # ring slots per cache block at most


def slot_blocks(stream: StreamConfig) -> tuple[tuple[int, int], ...]:
    """(first slot, slots) of each cache block (static): the S sinks (if any), then the ring in
    near-equal blocks of at most `RING_BLOCK` slots. A long dense cache is many blocks, and a
    chunk attends only to those holding a token it can see."""
    n_ring = -(-stream.window // RING_BLOCK)
    base, extra = divmod(stream.window, n_ring)
    sizes = [stream.sinks] if stream.sinks else []
    sizes += [base + (i < extra) for i in range(n_ring)]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return tuple(zip(starts, sizes, strict=True))


def init_cache(cfg: ModelConfig, stream: StreamConfig, batch: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` streams, every row at position 0."""
    B, K, H = batch, cfg.num_kv_heads, cfg.head_dim
    blocks = slot_blocks(stream)
    layers = tuple(
        LayerCache(
            keys=tuple(jnp.zeros((B, K, H, n), dtype) for _, n in blocks),
            values=tuple(jnp.zeros((B, K, n, H), dtype) for _, n in blocks),
        )
        for _ in range(cfg.num_layers)
    )
    return KVCache(layers=layers, pos=jnp.zeros((batch,), jnp.int32), stream=stream)


def cache_bytes(cfg: ModelConfig, stream: StreamConfig, batch: int, dtype=jnp.float32) -> int:
    """Bytes `init_cache` allocates, computed without allocating."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, stream, batch, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def ring_index(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """r(k) = (k - S) mod W, the ring offset of stream index k >= S (int32, any shape)."""
    return jnp.mod(k - stream.sinks, stream.window)


def slot_of(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """The cache slot of stream index k, counting sink slots then ring slots: k for a sink,
    S + r(k) for a ring token."""
    return jnp.where(k < stream.sinks, k, stream.sinks + ring_index(stream, k))


def key_rotation(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """The position a key of stream index k is rotated by when cached: k (sink) or r(k)."""
    return jnp.where(k < stream.sinks, k, ring_index(stream, k))


def slot_tokens(stream: StreamConfig, pos: jax.Array) -> jax.Array:
    """Stream index held by every slot (sinks, then ring) after `pos` tokens; -1 if empty.

    pos: [B] int32 -> [B, S + W] int32. Ring slot S + r holds the latest k < pos with r(k) = r.
    """
    S, W = stream.sinks, stream.window
    slots = jnp.arange(stream.capacity, dtype=jnp.int32)[None, :]  # [1, K]
    last = pos[:, None] - 1  # [B, 1]
    ring_k = last - jnp.mod(last - S - (slots - S), W)  # latest k <= last in ring slot
    k = jnp.where(slots < S, slots, ring_k)
    filled = (k <= last) & ((slots < S) | (k >= S))
    return jnp.where(filled, k, -1)


def visible(stream: StreamConfig, t: jax.Array, k: jax.Array) -> jax.Array:
    """SPEC: query t sees key k (k <= t) iff k < S or k >= t - W. Empty keys (k < 0) are unseen.

    t: [B, C, 1], k: [B, 1, T] -> [B, C, T] bool.
    """
    return (k >= 0) & (k <= t) & ((k < stream.sinks) | (k >= t - stream.window))


def query_variant(stream: StreamConfig, t: jax.Array, k: jax.Array) -> jax.Array:
    """Which rotation of query t scores key k: SINK, RING_SAME or RING_PREV ([B, C, T] int32)."""
    S, W = stream.sinks, stream.window
    same_lap = jnp.floor_divide(t - S, W) == jnp.floor_divide(k - S, W)
    return jnp.where(k < S, SINK, jnp.where(same_lap, RING_SAME, RING_PREV)).astype(jnp.int32)


def query_rotations(stream: StreamConfig, t: jax.Array) -> jax.Array:
    """Positions of the three query variants of stream index t: [..., 3] int32 in variant order.

    Dense mode never wraps and keeps no sinks, so only RING_SAME is used there (r(t) = t).
    """
    r = ring_index(stream, t)
    sink_pos = jnp.minimum(t, stream.capacity)
    return jnp.stack([r, r + stream.window, sink_pos], axis=-1)


def rotation_count(stream: StreamConfig) -> int:
    """Every rotation is an integer below this (static): queries r(t) + W < 2W (r(t) < W when
    the ring never wraps), sinks min(t, K) <= K, keys below max(S, W)."""
    n = 2 * stream.window if stream.wraps else stream.window
    return max(n, stream.capacity + 1 if stream.sinks else 0)


def used_variants(stream: StreamConfig) -> tuple[int, ...]:
    """The variants a stream can need (static): fewer variants, fewer score dot products."""
    used = [RING_SAME]
    if stream.wraps:
        used.append(RING_PREV)
    if stream.sinks:
        used.append(SINK)
    return tuple(used)
