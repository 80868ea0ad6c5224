"""Which keys each query sees, and at which distance: the attention view, made once per step
for every layer whose cache follows the same stream, and the one way masks are made.

Two kinds, one per cache layout: `View` (a float cache: sinks + ring, wrapping or dense, its
ring keys rebased once per lap) and `Int8View` (an int8 ring, whose keys are never rotated
after the write: see `jaxsink.traced.cache`). Static fields (a change recompiles) are marked
`pytree_node=False`; everything else is an array.

Letters: B batch, C chunk (queries), S cache slots (sinks then ring), J chunk keys, T the keys
of one group, V query rotation variants (see `jaxsink.traced.cache`), R rotary dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxsink import config as C
from jaxsink.traced import cache as kv
from jaxsink.traced.rope import rotary, rotary_table

MASKED = -1e30  # finite, so a row with nothing visible (padding) gives no NaN


def masking(seen: jax.Array) -> jax.Array:
    """The one form of a mask: an added float32 term, 0 where a query sees a key and MASKED
    where it does not. Added to a score s it gives exactly MASKED (|s| is far below MASKED's
    float32 spacing), as a select would, and an add fuses into XLA:CPU's kernels where a
    select splits them (SmolLM2, B = 16 decode step 104 vs 83 ms)."""
    return jnp.where(seen, 0.0, MASKED)


@struct.dataclass
class Group:
    """One group of keys that attention reads at once: the sink block with the chunk's own
    keys, or one ring block.

    seen: [B, V, C, T] bool, whether the queries of each variant the group is scored by
    (`variants`) see each key: every key is seen under one variant at most, its own;
    dist: [B, C, T] float32, the contract's distance d(t, k) (for ALiBi), or None;
    live: [] bool, whether any query sees any key of the group (a dense ring block, tested
    at run time and skipped while empty), or None: always read.
    variants: the query variants the group is scored by (static).
    """

    seen: jax.Array
    dist: jax.Array | None
    live: jax.Array | None
    variants: tuple[int, ...] = struct.field(pytree_node=False)


@struct.dataclass
class Rotations:
    """One `config.Rotary`'s cos/sin for a step (`rotary` pairs): q of the queries' rotation
    per variant [B, C, V, 1, R/2], k of the chunk's keys [B, C, 1, R/2]; rebase: None for a
    cache whose ring keys never move, else (whether any row's chunk entered a later lap []
    bool, the rotation by each row's shift of the ring base [B, 1, R/2] pair)."""

    q: tuple[jax.Array, jax.Array]
    k: tuple[jax.Array, jax.Array]
    rebase: tuple | None


@struct.dataclass
class View:
    """Which keys each query of a chunk sees, for every layer whose cache follows `stream`.

    groups: the sink block with the chunk's keys, then each ring block (`Group`);
    write_slot: [B, C] the cache slot each chunk token is written to (K = dropped: padding,
    or a ring token a later token of the same chunk replaces);
    rotations: per entry of `rotaries`, its `Rotations`.
    Static: blocks, the cache blocks ((first slot, slots) each); n_sinks; rotaries, the
    distinct `config.Rotary`s of the layers.
    """

    groups: tuple[Group, ...]
    write_slot: jax.Array
    rotations: tuple[Rotations, ...]
    blocks: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
    n_sinks: int = struct.field(pytree_node=False)
    rotaries: tuple[C.Rotary, ...] = struct.field(pytree_node=False)

    def rotations_of(self, spec: C.Rotary) -> Rotations:
        return self.rotations[self.rotaries.index(spec)]


@struct.dataclass(kw_only=True)
class Int8View(View):
    """`View` of an int8 cache (slot rotation, no rebase). ring_token: [B, C] bool, whether
    each chunk token is a ring token, quantized as the cache will store it."""

    ring_token: jax.Array


@struct.dataclass
class PolicyView:
    """The view of a layer cache that evicts by attention (`stream.policy` tova or h2o: see
    `jaxsink.traced.policy`), whose chunk's tokens enter one by one.

    t: [B, C] int32, each chunk token's stream index; valid: [B, C] bool; tables: per entry of
    `rotaries`, the cos/sin of in-cache positions 0 .. K ([K + 1, 2, R/2], `rotary_table`),
    read by rank. Static: the stream (its sinks, capacity, policy and recent window), the
    cache blocks, the rotaries.
    """

    t: jax.Array
    valid: jax.Array
    tables: tuple[jax.Array, ...]
    stream: C.StreamConfig = struct.field(pytree_node=False)
    blocks: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
    rotaries: tuple[C.Rotary, ...] = struct.field(pytree_node=False)

    def table_of(self, spec: C.Rotary) -> jax.Array:
        return self.tables[self.rotaries.index(spec)]


def policy_view(
    stream: C.StreamConfig, pos: jax.Array, valid: jax.Array, positions, span: int, dtype
) -> PolicyView:
    """`PolicyView` of the layers whose caches follow `stream` (an evicting one), for rows at
    stream positions `pos` [B] reading a chunk with `valid` [B, C] (span: as
    `attention_view`'s)."""
    t = pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, C]
    rotaries = tuple(dict.fromkeys(p for p in positions if isinstance(p, C.Rotary)))
    tables = tuple(
        jnp.asarray(rotary_table(stream.capacity + 1, spec, span), dtype) for spec in rotaries
    )
    return PolicyView(t, valid, tables, stream, kv.slot_blocks(stream), rotaries)


def variant_seen(seen: jax.Array, variant: jax.Array | None, n: int) -> jax.Array:
    """seen [B, C, T] and each key's variant [B, 1, T] (None: one variant) -> [B, n, C, T]:
    what each of the n variants' queries see."""
    if variant is None:
        return seen[:, None]
    return seen[:, None] & (variant[:, :, None, :] == jnp.arange(n)[:, None, None])


def attention_view(
    stream: C.StreamConfig,
    pos: jax.Array,
    valid: jax.Array,
    positions,
    span: int,
    dtype,
    int8: bool = False,
) -> View | PolicyView:
    """The view of the layers whose caches follow `stream` (their `position`s listed in
    `positions`), for rows at stream positions `pos` [B] reading a chunk with `valid` [B, C].
    span: the in-cache positions of the model's stream (`span`), on which longrope's
    factors depend. int8: the cache is int8 (static): an `Int8View`. A stream that evicts
    by attention gets a `PolicyView` (`policy_view`).

    The groups' query variants: the sink group is scored by every variant a key of it can
    need (each key by its own: a sink's, or a chunk key's ring variant), a float ring block
    by the ring's one, an int8 ring block by its two laps' (`jaxsink.traced.cache`).
    """
    if stream.policy != "sink":
        return policy_view(stream, pos, valid, positions, span, dtype)
    S, W = stream.sinks, stream.window
    C_ = valid.shape[1]
    t = pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, C]
    pos_after = pos + valid.sum(axis=1, dtype=jnp.int32)  # [B]
    base = kv.ring_base(stream, pos)  # [B]
    cached = kv.slot_tokens(stream, pos)  # [B, S]: sink slots, then ring slots
    chunk = jnp.where(valid, t, -1)  # [B, J]
    tq = t[:, :, None]
    see_cached = kv.visible(stream, tq, cached[:, None, :])  # [B, C, S]
    see_chunk = kv.visible(stream, tq, chunk[:, None, :])  # [B, C, J]
    n_rot = kv.rotation_count(stream, C_)
    if int8:  # slot rotation: keys never re-rotated, two ring variants told apart by lap parity
        var_chunk = kv.slot_variant(stream, chunk[:, None, :])  # [B, 1, J]
        n_variants = kv.slot_variants(stream)
        ring_variants = sink_variant = kv.ring_variants(stream)
        q_pos = kv.slot_query_rotations(stream, t)  # [B, C, V]
        k_pos = kv.slot_key_rotation(stream, t)  # [B, C]
    else:
        var_chunk = kv.query_variant(stream, chunk[:, None, :])
        n_variants = len(kv.used_variants(stream))
        ring_variants, sink_variant = 1, kv.SINK
        q_pos = kv.query_rotations(stream, t, base[:, None])[..., :n_variants]
        k_pos = kv.key_rotation(stream, t, base[:, None])  # [B, C]
    shift = kv.ring_base(stream, pos_after) - base  # [B], a multiple of W
    rotaries = tuple(dict.fromkeys(p for p in positions if isinstance(p, C.Rotary)))
    rotations = []
    for spec in rotaries:
        table = jnp.asarray(rotary_table(n_rot, spec, span), dtype)  # [P, 2, R/2]
        plain = table
        if spec.cos_sin_scale() != 1.0:
            plain = jnp.asarray(rotary_table(n_rot, spec, span, scaled=False), dtype)
        rebase = (shift.max() > 0, rotary(plain, shift)) if stream.wraps and not int8 else None
        rotations.append(Rotations(rotary(table, q_pos), rotary(table, k_pos), rebase))
    alibi = any(isinstance(p, C.Alibi) for p in positions)
    dist_cached = dist_chunk = None
    if alibi:
        dist_cached = kv.distance(stream, tq, cached[:, None, :]).astype(jnp.float32)
        dist_chunk = kv.distance(stream, tq, chunk[:, None, :]).astype(jnp.float32)
    # A chunk token is written unless a later token of the same chunk takes its ring slot.
    kept = valid & ((t < S) | (t >= pos_after[:, None] - W))
    write_slot = jnp.where(kept, kv.slot_of(stream, t), stream.capacity)
    blocks = kv.slot_blocks(stream)

    # The sink group: the sink block (if any) with the chunk's own keys, each key seen under
    # its own variant.
    seen, variant, dist = see_chunk, var_chunk, dist_chunk
    ring = blocks
    if S:
        (_, n), ring = blocks[0], blocks[1:]
        seen = jnp.concatenate([see_cached[..., :n], seen], axis=-1)
        sinks = jnp.full((*variant.shape[:2], n), sink_variant, variant.dtype)
        variant = jnp.concatenate([sinks, variant], axis=-1)
        if alibi:
            dist = jnp.concatenate([dist_cached[..., :n], dist], axis=-1)
    groups = [Group(variant_seen(seen, variant, n_variants), dist, None, tuple(range(n_variants)))]
    # Each ring block. Whether any query of the chunk sees any of its slots is a run-time test
    # only for the blocks of a cache that never wraps, which stay partly empty for the whole
    # stream (each test costs a conditional per layer to compile); a wrapping ring is empty
    # during its first W tokens only: always read.
    laps = kv.slot_variant(stream, cached) if int8 else None  # [B, S]: each slot's lap parity
    for start, n in ring:
        seen = see_cached[..., start : start + n]  # [B, C, n]
        live = None if stream.wraps else seen.any()
        dist = None if dist_cached is None else dist_cached[..., start : start + n]
        if int8:  # each lap's queries see the keys of their lap
            lap = laps[:, None, start : start + n]  # [B, 1, n]
            groups.append(
                Group(
                    variant_seen(seen, lap, ring_variants), dist, live, tuple(range(ring_variants))
                )
            )
        else:
            groups.append(Group(seen[:, None], dist, live, (kv.RING,)))
    fields = dict(
        groups=tuple(groups),
        write_slot=write_slot,
        rotations=tuple(rotations),
        blocks=blocks,
        n_sinks=S,
        rotaries=rotaries,
    )
    return Int8View(**fields, ring_token=t >= S) if int8 else View(**fields)


def span(stream: C.StreamConfig) -> int:
    """How many in-cache positions a stream's queries and keys take: K + 1 for a cache that
    wraps (the query sits at min(t, K)), K for a dense one. One value for the whole model, so
    that longrope picks one set of factors for every layer, as Hugging Face does for a whole
    sequence."""
    return stream.capacity + 1 if stream.wraps else stream.capacity
