"""The fixed-shape sink + ring KV cache and the contract's index arithmetic over it.

Slots `0 .. S-1` hold the first S tokens of the stream (sinks) forever; slots `S .. S+W-1` are a
ring: stream token k >= S lives in slot `S + (k - S) mod W` until token k + W replaces it. Each
batch row is its own stream with its own position `pos[b]` (tokens consumed so far).

Keys are cached *rotated by a small in-cache position*, never by the stream index:
  - sink k (k < S):   rotated by k,
  - ring token k:     rotated by k - b, b = `ring_base(pos)` = S + W max(lap(pos) - 1, 0)
                      with lap(x) = (max(x, S) - S) // W: the ring holds tokens k >= b with
                      k >= pos - W, so every ring rotation is in [0, 2W) (in [0, W) during
                      the first lap, as in a cache that never evicted).
When a chunk carries `pos` into a later lap, b moves by a multiple of W and every ring key is
rotated back by that much after the chunk's write: at most twice per key (by the chunk that
wrote it, and when the next lap begins), since a key stays in the ring for at most W tokens.
A query at stream index t (in a chunk starting at `pos`) scores a key with one of two rotations
of itself ("variants"):
  - RING: a ring key:  query rotated by t - b,
  - SINK: a sink key:  query rotated by min(t, K),
so every score sees exactly the contract's distance d(t, k) (t - k for recent keys, min(t, K) - k for
sinks) with one query rotation for the whole ring, and every angle is below 2W + C: nothing
depends on t in floating point. A dense cache never wraps: b = 0 for good.

An int8 cache (`init_cache(..., dtype=jnp.int8)`) keeps its sinks in float32 (exact) and each
ring key and value as int8 codes with one float32 scale per token and kv head (`Int8Block`).
Re-rotating codes would quantize them again, so its ring keys are never rotated after the
write ("slot rotation"): ring token k is rotated by its ring offset r(k) = (k - S) mod W and
quantized once. The ring then holds keys of two laps, lap(k) = (k - S) // W, which need two
query rotations, told apart by the lap's parity:
  - EVEN / ODD: a ring key of an even / odd lap: query rotated by t - S - W L, L the latest
               lap <= lap(t) of that parity (so r(t) or r(t) + W, below 2W),
  - SINK: as above, min(t, K).
`slot_query_rotations`, `slot_key_rotation` and `slot_variant` are the int8 cache's
`query_rotations`, `key_rotation` and `query_variant`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsink.config import CACHE_DTYPES, Attention, ConfigError, ModelConfig, StreamConfig

RING, SINK = 0, 1
INT8 = np.dtype(np.int8)  # the cache dtype of an int8 cache (`Int8Block` ring, float32 sinks)


@struct.dataclass
class Int8Block:
    """A ring block of an int8 cache: int8 codes and one float32 scale per slot and kv head,
    the stored value being `codes * scale` (`quantize`).

    codes: keys [B, Hkv, H, n] / values [B, Hkv, n, H] int8 in [-127, 127];
    scale: keys [B, Hkv, 1, n] / values [B, Hkv, n, 1] float32 (laid out like the codes, so
      that a block's codes and scales shard and slice alike).
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


def quantize(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization over `axis` (a head's H features): (codes int8 in
    [-127, 127], scale float32 with `axis` kept as 1), scale = max |x| / 127 and codes =
    round(x / scale) (to nearest, ties to even); an all-zero x gives codes 0, scale 0.
    `codes * scale` is within scale / 2 of x in every element."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
    return codes, scale


def dequantize(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """`quantize`'s stored value: codes * scale, in `dtype`."""
    return (codes.astype(jnp.float32) * scale).astype(dtype)


@struct.dataclass
class LayerCache:
    """One layer's keys/values for every stream in the batch (keys rotated as in the module
    docstring): its K = S + W slots, sinks then ring, stored as consecutive blocks (see
    `slot_blocks`), each its own buffers, so attention reads a block without slicing a copy and
    skips a block no query can see. Keys are stored transposed, the layout the score product
    reads without a transposing copy.

    keys: one [B, Hkv, H, n] per block; values: one [B, Hkv, n, H] per block (n slots each);
      in an int8 cache each ring block is an `Int8Block` of those shapes.
    stream: static: which tokens this layer keeps (`layer_stream`): the cache's stream for a
      full layer, a ring of its own for a native sliding-window layer.
    ranks: under an eviction policy (`stream.policy` tova or h2o: `jaxsink.traced.policy`),
      [B, K] int32, each slot's rank among the cached tokens in stream order (its in-cache
      position; keys are then stored un-rotated and rotated by it when read); else None.
    scores: under h2o, [B, K] float32, the attention each slot's token has received so far;
      else None.
    """

    keys: tuple[jax.Array | Int8Block, ...]
    values: tuple[jax.Array | Int8Block, ...]
    stream: StreamConfig = struct.field(pytree_node=False)
    ranks: jax.Array | None = None
    scores: jax.Array | None = None

    @property
    def int8(self) -> bool:
        """Whether the ring is stored int8 (`Int8Block`s): static, from the pytree's structure."""
        return any(isinstance(b, Int8Block) for b in self.keys)


@struct.dataclass
class KVCache:
    """Every layer's sink and ring slots, and the stream position of every batch row.

    layers: one `LayerCache` per layer, each its own buffers: a layer reads and updates its
      cache in place, where slicing one stacked [L, ...] array would copy it.
    pos:  [B] int32, each row's stream index of its next token, less `epoch` x the folding
      quantum (`fold`): every computation depends on it only modulo each ring's W once the
      rings are full, so it is kept small and the stream counter exact without limit.
    epoch: [B] int32, how many folding quanta (a multiple of every ring's W near 2^29) each row
      has passed: the stream index is `epoch * quantum + pos` (`stream_index`), exact far
      past 2^40 tokens without 64-bit types.
    stream: static: which tokens the full layers keep (native sliding-window layers keep their
      own window: `layer_stream`). Changing it recompiles.
    """

    layers: tuple[LayerCache, ...]
    pos: jax.Array
    epoch: jax.Array
    stream: StreamConfig = struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def int8(self) -> bool:
        """Whether the rings are stored int8 (static)."""
        return any(lc.int8 for lc in self.layers)

    @property
    def dtype(self) -> np.dtype:
        """The cache dtype `init_cache` was given: `INT8` for an int8 cache, else its keys'."""
        return INT8 if self.int8 else np.dtype(self.layers[0].keys[0].dtype)


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


# The slot axis of a block of keys ([B, Hkv, H, n], int8 scales [B, Hkv, 1, n]) and of values
# ([B, Hkv, n, H], int8 scales [B, Hkv, n, 1]).
KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 3, 2


def with_first_slots(layers: tuple[LayerCache, ...], tokens: int, resize) -> tuple:
    """`layers` with every block resized along its slot axis to the slots the first `tokens`
    tokens of a stream fill (token t < K sits in slot t, so the first min(tokens, K) of each
    layer's own stream): `resize(array, axis, kept, n)` gives a block of `n` slots that keeps
    its first `kept` (static). Slicing keeps a stream's state without its empty slots; padding
    gives them back."""

    def layer(lc: LayerCache) -> LayerCache:
        used = min(tokens, lc.stream.capacity)

        def each(blocks, axis):
            return tuple(
                jax.tree.map(
                    lambda x, a=axis, s=start, n=n: resize(x, a, min(max(used - s, 0), n), n), b
                )
                for (start, n), b in zip(slot_blocks(lc.stream), blocks, strict=True)
            )

        def per_slot(x):  # a policy's [B, K] array
            return None if x is None else resize(x, 1, used, lc.stream.capacity)

        return lc.replace(
            keys=each(lc.keys, KEY_SLOT_AXIS),
            values=each(lc.values, VALUE_SLOT_AXIS),
            ranks=per_slot(lc.ranks),
            scores=per_slot(lc.scores),
        )

    return tuple(layer(lc) for lc in layers)


def layer_stream(attention: Attention, stream: StreamConfig) -> StreamConfig:
    """Which tokens a layer keeps in a cache whose full layers follow `stream` (static).

    A full layer: `stream` itself. A native sliding-window layer of w: a ring of its own w - 1
    slots and no sinks (the query's own key is the w-th), whatever `stream` says; a dense cache
    shorter than that keeps its `stream` (it never evicts, so it is already exact).
    """
    w = attention.sliding_window
    if w is None:
        return stream
    if stream.mode == "dense" and stream.window <= w - 1:
        return stream
    return StreamConfig(0, w - 1, "window")


def init_cache(
    cfg: ModelConfig,
    stream: StreamConfig,
    batch: int,
    dtype=jnp.float32,
    native_windows: bool = True,
) -> KVCache:
    """An empty cache for `batch` streams, every row at position 0.

    dtype: float32 or bfloat16 for every slot; int8 (`INT8`) for an int8 cache: ring keys and
      values as `Int8Block`s, the sink slots in float32, which holds the keys and values of a
      model of any dtype exactly.
    native_windows: False gives every layer `stream`'s cache, as if no layer had a native
      sliding window (only to measure what the native windows save).
    Raises ConfigError if the model sets a `position_limit` the cache's positions could reach.
    """
    if cfg.position_limit is not None and stream.capacity >= cfg.position_limit:
        raise ConfigError(
            f"a cache of {stream.capacity} slots reaches in-cache position {stream.capacity}, "
            f"where this {cfg.architecture} model's attention changes (seq_length "
            f"{cfg.position_limit}: logn scaling / dynamic NTK); use sinks + window below it"
        )

    int8 = np.dtype(dtype) == INT8
    if int8 and stream.policy != "sink":
        raise ConfigError(
            f"--policy {stream.policy} keeps its keys un-rotated in a float cache: use "
            "--cache-dtype float32 or bfloat16"
        )

    def buffer(shape, scale_shape, ring: bool):
        if int8 and ring:
            return Int8Block(jnp.zeros(shape, jnp.int8), jnp.zeros(scale_shape, jnp.float32))
        return jnp.zeros(shape, jnp.float32 if int8 else dtype)

    def layer_cache(attention):
        B, K, H = batch, attention.num_kv_heads, attention.head_dim
        own = layer_stream(attention, stream) if native_windows else stream
        blocks = slot_blocks(own)
        evicting = own.policy != "sink"
        return LayerCache(
            keys=tuple(
                buffer((B, K, H, n), (B, K, 1, n), start >= own.sinks) for start, n in blocks
            ),
            values=tuple(
                buffer((B, K, n, H), (B, K, n, 1), start >= own.sinks) for start, n in blocks
            ),
            stream=own,
            ranks=jnp.zeros((B, own.capacity), jnp.int32) if evicting else None,
            scores=jnp.zeros((B, own.capacity), jnp.float32) if own.policy == "h2o" else None,
        )

    layers = tuple(layer_cache(spec.attention) for spec in cfg.layers)
    pos, epoch = (jnp.zeros((batch,), jnp.int32) for _ in range(2))  # two buffers: both donated
    return KVCache(layers=layers, pos=pos, epoch=epoch, stream=stream)


FOLD_AT = 2**29  # the folding quantum is the first multiple of the rings' windows from here


def fold_quantum(cache: KVCache) -> int | None:
    """The number of tokens `fold` takes out of `pos` at once: the least common multiple of every
    ring's window (full layers' and native sliding layers'), times what brings it to 2^29 or
    more; None for a dense cache (bounded, never folded) or windows whose multiple passes 2^30."""
    if not cache.stream.wraps:
        return None
    windows = {lc.stream.window for lc in cache.layers} | {cache.stream.window}
    common = math.lcm(*windows)
    quantum = common * max(1, -(-FOLD_AT // common))
    return quantum if quantum <= 2**30 else None


def fold(cache: KVCache, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pos, epoch) after a chunk moved the rows to `pos` [B]: a row far enough in (every ring
    full for a whole quantum, so every slot, lap and distance repeats) gives one quantum of its
    position to its epoch. Nothing the model computes changes (rings repeat every W tokens; a
    sink's distance stops at K)."""
    quantum = fold_quantum(cache)
    if quantum is None:
        return pos, cache.epoch
    reach = 2 * max(lc.stream.capacity for lc in cache.layers)
    far = pos >= quantum + reach
    return jnp.where(far, pos - quantum, pos), cache.epoch + far.astype(jnp.int32)


def stream_index(cache: KVCache) -> list[int]:
    """Each row's exact stream index (tokens consumed), as Python ints."""
    quantum = fold_quantum(cache) or 0
    pos, epoch = np.asarray(cache.pos), np.asarray(cache.epoch)
    return [int(e) * quantum + int(p) for e, p in zip(epoch, pos, strict=True)]


def folded_index(cache: KVCache, index: int) -> tuple[int, int]:
    """(pos, epoch) of exact stream index `index`, as `fold` would have kept them."""
    quantum = fold_quantum(cache)
    reach = 2 * max(lc.stream.capacity for lc in cache.layers)
    epoch = 0 if quantum is None or index < quantum + reach else (index - reach) // quantum
    pos = index - epoch * (quantum or 0)
    if index < 0 or pos >= 2**31 or epoch >= 2**31:
        raise ConfigError(f"stream index {index} is out of this cache's reach")
    return pos, epoch


def at_stream_index(cache: KVCache, index: int) -> KVCache:
    """The cache with every row's stream index set to `index` (its contents untouched), as
    `fold` would have kept it: for moving a full cache by a multiple of the windows (tests)."""
    pos, epoch = folded_index(cache, index)
    B = cache.batch
    return cache.replace(pos=jnp.full((B,), pos, jnp.int32), epoch=jnp.full((B,), epoch, jnp.int32))


def cache_bytes(
    cfg: ModelConfig,
    stream: StreamConfig,
    batch: int,
    dtype=jnp.float32,
    native_windows: bool = True,
) -> int:
    """Bytes `init_cache` allocates, computed without allocating."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, stream, batch, dtype, native_windows))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def ring_index(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """r(k) = (k - S) mod W, the ring offset of stream index k >= S (int32, any shape)."""
    return jnp.mod(k - stream.sinks, stream.window)


def slot_of(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """The cache slot of stream index k, counting sink slots then ring slots: k for a sink,
    S + r(k) for a ring token."""
    return jnp.where(k < stream.sinks, k, stream.sinks + ring_index(stream, k))


def ring_base(stream: StreamConfig, pos: jax.Array) -> jax.Array:
    """b: the stream index ring keys are rotated relative to after `pos` tokens (int32, any
    shape): S + W max(lap(pos) - 1, 0) for a ring that wraps, 0 for a dense cache."""
    if not stream.wraps:
        return jnp.zeros_like(pos)
    lap = jnp.floor_divide(jnp.maximum(pos, stream.sinks) - stream.sinks, stream.window)
    return stream.sinks + stream.window * jnp.maximum(lap - 1, 0)


def key_rotation(stream: StreamConfig, k: jax.Array, base: jax.Array) -> jax.Array:
    """The position a key of stream index k is rotated by when cached under ring base `base`
    (broadcast with k): k for a sink, k - base for a ring token."""
    return jnp.where(k < stream.sinks, k, k - base)


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
    """The contract: query t sees key k (k <= t) iff k < S or k >= t - W. Empty keys (k < 0) are unseen.

    t: [B, C, 1], k: [B, 1, T] -> [B, C, T] bool.
    """
    return (k >= 0) & (k <= t) & ((k < stream.sinks) | (k >= t - stream.window))


def distance(stream: StreamConfig, t: jax.Array, k: jax.Array) -> jax.Array:
    """The contract: the distance d(t, k) the position encoding sees, t - k for a recent key and
    min(t, K) - k for a sink (a dense cache has no sinks: always t - k). Broadcasts t with k,
    e.g. t [B, C, 1], k [B, 1, T] -> [B, C, T] int32 (meaningless where k is not visible)."""
    return jnp.where(k < stream.sinks, jnp.minimum(t, stream.capacity), t) - k


def query_variant(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """Which rotation of the query scores key k: SINK or RING (int32, k's shape)."""
    return jnp.where(k < stream.sinks, SINK, RING).astype(jnp.int32)


def query_rotations(stream: StreamConfig, t: jax.Array, base: jax.Array) -> jax.Array:
    """Positions of the query variants of stream index t under ring base `base` (broadcast with
    t): [..., 2] int32 in variant order (t - base, min(t, K))."""
    return jnp.stack([t - base, jnp.minimum(t, stream.capacity)], axis=-1)


def rotation_count(stream: StreamConfig, chunk: int) -> int:
    """Every rotation of a chunk of `chunk` tokens is an integer below this (static): ring
    queries t - b < 2W + C (t < W for a dense cache), ring keys and rebase shifts below them,
    sinks min(t, K) <= K."""
    ring = 2 * stream.window + chunk if stream.wraps else stream.window
    return max(ring, stream.capacity + 1 if stream.sinks else 0)


def used_variants(stream: StreamConfig) -> tuple[int, ...]:
    """The variants a stream can need (static): fewer variants, fewer score dot products."""
    return (RING, SINK) if stream.sinks else (RING,)


# --- an int8 cache's slot rotation (module docstring) ---------------------------------------


def ring_variants(stream: StreamConfig) -> int:
    """How many query rotations an int8 cache's ring needs (static): EVEN and ODD for a ring
    that wraps, one for a dense cache (lap 0 for good). The SINK variant follows them."""
    return 2 if stream.wraps else 1


def slot_variants(stream: StreamConfig) -> int:
    """How many query variants an int8 cache's stream needs (static): its ring variants, plus
    SINK when it keeps sinks."""
    return ring_variants(stream) + (1 if stream.sinks else 0)


def lap(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """The lap of stream index k (int32, any shape): (max(k, S) - S) // W."""
    return jnp.floor_divide(jnp.maximum(k, stream.sinks) - stream.sinks, stream.window)


def slot_key_rotation(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """The position an int8 cache's key of stream index k is rotated by, for good: k for a
    sink, its ring offset r(k) = (k - S) mod W for a ring token."""
    return jnp.where(k < stream.sinks, k, ring_index(stream, k))


def slot_variant(stream: StreamConfig, k: jax.Array) -> jax.Array:
    """Which query variant scores key k in an int8 cache (int32, k's shape): its lap's parity
    (EVEN = 0, ODD = 1; 0 for a dense cache) for a ring token, SINK (`ring_variants`) for a
    sink. Meaningless for an empty slot (k < 0), which no query sees."""
    ring = jnp.mod(lap(stream, k), ring_variants(stream))
    return jnp.where(k < stream.sinks, ring_variants(stream), ring).astype(jnp.int32)


def slot_query_rotations(stream: StreamConfig, t: jax.Array) -> jax.Array:
    """Positions of an int8 cache's query variants of stream index t: [..., V] int32 in variant
    order (`slot_variant`): for parity p, t - S - W L with L the latest lap <= lap(t) of parity
    p (r(t) or r(t) + W), then min(t, K) for the sinks. The score of a ring key k of parity p
    then sees R(t - S - W lap(k)) q . R(r(k)) k_k = the contract's distance t - k."""
    r = ring_index(stream, jnp.maximum(t, stream.sinks))
    n = ring_variants(stream)
    out = [r + stream.window * jnp.mod(lap(stream, t) - p, 2) for p in range(n)]
    if stream.sinks:
        out.append(jnp.minimum(t, stream.capacity))
    return jnp.stack(out, axis=-1)


def cache_dtype_of(dtype, cache_dtype):
    """The cache's dtype: `cache_dtype` (a name of `CACHE_DTYPES` or a dtype; int8 is the int8
    cache of `init_cache`), else `dtype`, the model's."""
    if cache_dtype is None:
        return jnp.dtype(dtype)
    if not isinstance(cache_dtype, str):  # already a dtype
        return jnp.dtype(cache_dtype)
    if cache_dtype not in CACHE_DTYPES:
        raise ConfigError(
            f"unknown cache dtype {cache_dtype!r} (expected one of {sorted(CACHE_DTYPES)})"
        )
    return jnp.dtype(CACHE_DTYPES[cache_dtype])
