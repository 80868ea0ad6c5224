"""Which keys each query sees, and at which distance: the attention view, made once per step
for every layer whose cache follows the same stream.

Letters: B batch, C chunk (queries), S cache slots (sinks then ring), J chunk keys, V query
rotation variants (see `jaxsink.traced.cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsink import config as C
from jaxsink.traced import cache as kv
from jaxsink.traced.rope import rotary, rotary_table

MASKED = -1e30  # finite, so a row with nothing visible (padding) gives no NaN


def attention_view(
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
    positions of the model's stream (`span`), on which longrope's factors depend.

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
    `jaxsink.traced.cache`): then also the ring's additive masks per variant count (`lap_masks`),
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
        view["lap_masks"] = {n: jnp.where(m, 0.0, MASKED) for n, m in masks.items()}
    return view


def span(stream: C.StreamConfig) -> int:
    """How many in-cache positions a stream's queries and keys take: K + 1 for a cache that
    wraps (the query sits at min(t, K)), K for a dense one. One value for the whole model, so
    that longrope picks one set of factors for every layer, as Hugging Face does for a whole
    sequence."""
    return stream.capacity + 1 if stream.wraps else stream.capacity
