"""A batch of rows, each its own stream, in the jitted steps: prefill chunks into some rows,
decode blocks of the live ones, a mixed step of both (`Decoder.segments`), and a row's state
taken out or put back. Rows are gathered out of the cache into a bucket and scattered back in
place (`jaxsink.engine` picks the buckets and drives the steps).

Letters: B rows of the engine, b rows of a bucket, C chunk, V vocab, T the alternatives
reported per token (`TOP_LOGPROBS`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxsink.traced import cache as kv
from jaxsink.traced.entry import TRACES, EntryPoint, last_valid
from jaxsink.traced.sampling import sample_rows


def _gathered(tree, index: jax.Array, batch: int | None):
    """The rows `index` [b] of every batch-major leaf of `tree` (an index of `batch`, past the
    last row, is padding: it reads the last row, which `_scattered` never writes back); all
    rows as they are when b is the whole batch (then `index` is every row in order; `batch`
    None: always a copy)."""
    if index.shape[0] == batch:
        return tree
    return jax.tree.map(lambda x: x.at[index].get(mode="clip"), tree)


def _scattered(tree, part, index: jax.Array, batch: int | None):
    """`tree` with its rows `index` [b] replaced by `part`'s (in place when donated); padding
    rows (`index` past the last row) are dropped."""
    if index.shape[0] == batch:
        return part
    return jax.tree.map(lambda x, y: x.at[index].set(y, mode="drop"), tree, part)


def _prefill_rows(weights, cache, logits, index, tokens, valid, graphdef):
    """Feed tokens [b, C] (valid [b, C]) into the rows `index` [b] (distinct) of the cache:
    gathered, run as one batch, scattered back in place. A row with a valid token gets its last
    valid token's logits into `logits` [B, V] float32; a row with none is left as it was (the
    padding of a bucket). Returns (cache, logits)."""
    TRACES["prefill_rows"] += 1
    module = nnx.merge(graphdef, weights)
    B = logits.shape[0]
    hidden, part = module(_gathered(cache, index, B), tokens, valid)
    new = module.logits(last_valid(hidden, valid)).T  # [b, V]
    old = _gathered(logits, index, B)
    fed = valid.any(axis=1)[:, None]
    return (
        _scattered(cache, part, index, B),
        _scattered(logits, jnp.where(fed, new, old), index, B),
    )


prefill_rows = EntryPoint(_prefill_rows, static=("graphdef",), donate=("cache", "logits"))


TOP_LOGPROBS = 5  # the most alternatives a row can ask to see at each token


def _logprobs(logits, token, want_top):
    """The model's log-probability of each row's `token` [B] under `logits` [B, V] float32
    (before temperature or cuts, as OpenAI reports them), and, when a row wants them
    (`want_top` [B]), the TOP_LOGPROBS most likely tokens: ([B], ids [B, T], values [B, T])."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.maximum(token, 0)[:, None], axis=1)[:, 0]

    def top(logp):
        values, ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return ids.astype(jnp.int32), values

    shape = (logp.shape[0], TOP_LOGPROBS)
    none = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))
    ids, values = jax.lax.cond(jnp.any(want_top), top, lambda _: none, logp)
    return chosen, ids, values


@struct.dataclass
class Rows:
    """Every row's decode state: one pytree in and out of the decode loop, [B, ...] each.

    logits: [B, V] float32, each row's next-token logits; keys: [B] PRNG keys; live: [B] bool,
    decoding now; n_left: [B] int32, tokens it may still draw; temperature [B] float32, top_k
    [B] int32, top_p [B] float32: its sampling (`RowSampling`); want_top: [B] bool, whether it
    reports the TOP_LOGPROBS most likely alternatives of each token.
    """

    logits: jax.Array
    keys: jax.Array
    live: jax.Array
    n_left: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    want_top: jax.Array

    @classmethod
    def idle(cls, batch: int, vocab: int, keys: jax.Array) -> Rows:
        """Rows not live, greedy, no alternatives, zero logits (host arrays but `keys`)."""
        return cls(
            logits=np.zeros((batch, vocab), np.float32),
            keys=keys,
            live=np.zeros(batch, bool),
            n_left=np.zeros(batch, np.int32),
            temperature=np.zeros(batch, np.float32),
            top_k=np.zeros(batch, np.int32),
            top_p=np.ones(batch, np.float32),
            want_top=np.zeros(batch, bool),
        )


@struct.dataclass
class Drawn:
    """What a decode block drew for each of its b rows: tokens [b, block] int32 (-1: none),
    their log-probabilities [b, block] float32, and the TOP_LOGPROBS most likely ids [b, block,
    T] int32 and log-probabilities [b, block, T] float32 at each (zeros unless asked)."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _drawn(r: Rows, eos_ids):
    """One decode step's draw for rows `r` [b]: each live row samples from its logits with its
    own key and settings. Returns (token [b] int32, -1 for a row not live; fed [b], whether
    the token enters the cache: every token but an EOS; r with keys, `n_left` and `live`
    advanced (a row stopped by its budget may go on later); (log-probability [b], top ids
    [b, T], top log-probabilities [b, T]) of the token). A row not live keeps its key and
    logits untouched: what it goes on from when armed again or exported."""
    split = jax.vmap(jax.random.split)(r.keys)  # [b, 2]
    keys, draw = jnp.where(r.live, split[:, 0], r.keys), split[:, 1]
    token = sample_rows(r.logits.T, draw, r.temperature, r.top_k, r.top_p)
    token = jnp.where(r.live, token, -1)
    chances = _logprobs(r.logits, token, r.want_top & r.live)
    n_left = r.n_left - r.live.astype(jnp.int32)
    fed = r.live & ~jnp.isin(token, eos_ids)
    return token, fed, r.replace(keys=keys, live=fed & (n_left > 0), n_left=n_left), chances


def _decode_rows(weights, cache, rows: Rows, index, eos_ids, graphdef, block):
    """Up to `block` decode steps of the rows `index` [b] (distinct, or padding: see
    `_gathered`; gathered out of the cache and `rows`, scattered back in place): each live one
    draws (`_drawn`), records the token and its log-probability, is done after an EOS id or
    `n_left` tokens, and feeds its token for the next logits, however many steps the other
    rows take. Returns (Drawn [b, ...], cache, rows)."""
    TRACES["decode_rows"] += 1
    module = nnx.merge(graphdef, weights)
    B = rows.live.shape[0]
    part = _gathered(rows, index, B)
    part = part.replace(live=part.live & (index < B))  # padding rows never decode
    b = part.live.shape[0]

    def cond(c):
        i, _, part, _ = c
        return (i < block) & jnp.any(part.live)

    def body(c):
        i, cache, r, out = c
        token, fed, r, (chosen, top_ids, top_values) = _drawn(r, eos_ids)
        out = Drawn(
            out.tokens.at[:, i].set(token),
            out.logprobs.at[:, i].set(chosen),
            out.top_ids.at[:, i].set(top_ids),
            out.top_logprobs.at[:, i].set(top_values),
        )
        hidden, cache = module(cache, jnp.maximum(token, 0)[:, None], fed[:, None])
        logits = jnp.where(fed[:, None], module.logits(hidden[:, 0]).T, r.logits)  # [b, V]
        return i + 1, cache, r.replace(logits=logits), out

    T = TOP_LOGPROBS
    out = Drawn(
        jnp.full((b, block), -1, jnp.int32),
        jnp.zeros((b, block), jnp.float32),
        jnp.zeros((b, block, T), jnp.int32),
        jnp.zeros((b, block, T), jnp.float32),
    )
    init = (jnp.int32(0), _gathered(cache, index, B), part, out)
    _, cache_part, part, out = jax.lax.while_loop(cond, body, init)
    return out, _scattered(cache, cache_part, index, B), _scattered(rows, part, index, B)


decode_rows = EntryPoint(_decode_rows, static=("graphdef", "block"), donate=("cache", "rows"))


def _mixed_rows(weights, cache, rows: Rows, index, tokens, valid, eos_ids, graphdef):
    """One decode step of every live row and a prefill chunk of the rows `index` [b] (distinct
    rows not live, or padding: see `_gathered`; tokens [b, C], valid [b, C]) in one pass
    (`Decoder.segments`: each weight read once for both). The decode step is
    `_decode_rows`'s of all B rows with block 1; a prefilled row gets its last valid token's
    logits, as in `_prefill_rows`. Returns (Drawn [B, 1, ...], cache, rows)."""
    TRACES["mixed_rows"] += 1
    module = nnx.merge(graphdef, weights)
    token, fed, rows, (chosen, top_ids, top_values) = _drawn(rows, eos_ids)
    (hidden, cache), (hidden_fed, part) = module.segments(
        (
            (cache, jnp.maximum(token, 0)[:, None], fed[:, None]),
            (_gathered(cache, index, None), tokens, valid),
        )
    )
    B = rows.live.shape[0]
    both = jnp.concatenate([hidden[:, 0], last_valid(hidden_fed, valid)])  # [B + b, D]
    new = module.logits(both).T  # [B + b, V]: one vocabulary product for both
    logits = jnp.where(fed[:, None], new[:B], rows.logits)
    prompt = jnp.where(valid.any(axis=1)[:, None], new[B:], _gathered(logits, index, None))
    rows = rows.replace(logits=_scattered(logits, prompt, index, None))
    drawn = Drawn(token[:, None], chosen[:, None], top_ids[:, None], top_values[:, None])
    return drawn, _scattered(cache, part, index, None), rows


mixed_rows = EntryPoint(_mixed_rows, static=("graphdef",), donate=("cache", "rows"))


@jax.jit
def reset_row(pos, epoch, keys, row, seed):
    """A row's position reset to 0 and its key to `seed`'s (jitted: works across processes)."""
    return pos.at[row].set(0), epoch.at[row].set(0), keys.at[row].set(jax.random.key(seed))


def seed_key(seed: int) -> np.ndarray:
    """The PRNG key data (uint32) `Engine.open` gives a row for `seed`: a restored state's key
    replaced by it starts its sampling where a fresh stream with that seed would."""
    return np.asarray(jax.random.key_data(jax.random.key(np.uint32(seed))))


def take_row(cache, logits, keys, row, slots):
    """Row `row`'s state: (its one-row cache, logits [V], PRNG key data); the cache keeps the
    slots the first `slots` tokens fill (static; None: every slot)."""

    def cut(x):
        return jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)

    one = jax.tree.map(cut, cache)
    if slots is not None:
        layers = kv.with_first_slots(
            one.layers, slots, lambda x, axis, kept, _: jax.lax.slice_in_dim(x, 0, kept, axis=axis)
        )
        one = one.replace(layers=layers)
    return one, logits[row], jax.random.key_data(keys[row])


def put_row(cache, logits, keys, row, one, row_logits, key_data):
    """The engine's state with row `row` replaced by a one-row cache, logits and key data."""
    cache = jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), row, axis=0),
        cache,
        one,
    )
    keys = keys.at[row].set(jax.random.wrap_key_data(key_data))
    return cache, logits.at[row].set(row_logits), keys
