"""The batch engine: B rows, each an independent endless stream, in one compiled prefill and one
compiled decode loop.

A stream is inserted into a free row: the row's position is reset (its old slots become
invisible: a slot is seen only if it holds a token of the row's current stream) and its prompt
is prefilled in chunks into that row alone, the row cut out of the cache, run at batch 1 and
written back in place. Decode blocks run every live row together. Sampling settings are per row
and are arrays, not static arguments, so requests with different settings share one
executable. A finished row is released. None of this recompiles or touches the other rows.

`jaxsink.generate` is the B = 1 case of this engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink import cache as kv
from jaxsink import model as mdl
from jaxsink import sharding as sh
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.executables import EntryPoint, compiled
from jaxsink.loading import Model


def padded_chunks(ids: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The one padded-chunk loop: ids [B, N] -> (tokens [B, chunk] int32, valid [B, chunk] bool,
    n real tokens) per chunk, the last one padded and masked (never a new shape)."""
    ids = np.asarray(ids, np.int32)
    ids = ids[None] if ids.ndim == 1 else ids
    B, N = ids.shape
    for i in range(0, N, chunk):
        part = ids[:, i : i + chunk]
        n = part.shape[1]
        tokens, valid = np.zeros((B, chunk), np.int32), np.zeros((B, chunk), bool)
        tokens[:, :n], valid[:, :n] = part, True
        yield tokens, valid, n


def check_ids(ids: Sequence[int], vocab: int) -> np.ndarray:
    """Token ids [N >= 1] in [0, vocab), as int32 (ConfigError naming the first bad one)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size == 0:
        raise ConfigError("empty prompt: give at least one token")
    if ids.min() < 0 or ids.max() >= vocab:
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise ConfigError(f"token id {bad} is out of range [0, {vocab})")
    return ids.astype(np.int32)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ConfigError naming the first sampling setting out of range."""
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top-k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")


def cut_at_stop(text: str, piece: str, stops) -> tuple[str, int | None]:
    """`piece` appended to `text` and cut at the first of `stops` (a stop string may begin in
    `text`): (the part of `piece` to emit, where the stop string begins in `text + piece`, or
    None when there is none)."""
    whole = text + piece
    hits = [whole.find(s, max(0, len(text) - len(s) + 1)) for s in stops]
    cut = min((h for h in hits if h >= 0), default=None)
    if cut is None:
        return piece, None
    return whole[len(text) : max(cut, len(text))], cut


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One stream's sampling settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off;
    max_tokens: new tokens at most; stop: strings that end the text (checked on the host)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens < 1:
            raise ConfigError(f"max tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {self.seed}")


# --- sampling with per-row settings ---------------------------------------------------------


def greedy(logits: jax.Array, axis: int = -1) -> jax.Array:
    """The first index of each row's largest logit along `axis`, the vocabulary: logits [B, V]
    (or [V, B] with axis 0) -> [B] int32.

    Two plain reductions (max, then the smallest index holding it): XLA:CPU runs them several
    times faster than `jnp.argmax`'s paired (value, index) reduction. A row without a largest
    value (NaN) gives the last index rather than one out of range.
    """
    V = logits.shape[axis]
    top = logits.max(axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis % logits.ndim)
    first = jnp.min(jnp.where(logits == top, index, V), axis=axis)
    return jnp.minimum(first, V - 1)


def _threshold(values: jax.Array, enough, iterations: int = 40) -> jax.Array:
    """Per row, the largest t in [min, max] of `values` [V, B] with enough(values >= t) [B] true,
    by bisection (no sort of the vocabulary): within 2^-40 of the row's range."""
    lo, hi = values.min(axis=0), values.max(axis=0)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: enough(values >= lo)
        mid = (lo + hi) / 2
        ok = enough(values >= mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.where(enough(values >= hi), hi, lo)


def sample_rows(logits, keys, temperature, top_k, top_p) -> jax.Array:
    """One token per row from vocabulary-major logits [V, B] float32, each row with its own key
    [B] and settings [B] (temperature 0: greedy, the first largest logit; top_k 0 / top_p 1: no
    cut). Rows never mix: a row's token depends on its own logits, key and settings only."""
    best = greedy(logits, axis=0)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)

    def cut(scaled):
        k = jnp.where(top_k > 0, top_k, scaled.shape[0])
        kth = _threshold(scaled, lambda above: above.sum(axis=0) >= k)
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
        probs = jax.nn.softmax(scaled, axis=0)
        nucleus = _threshold(probs, lambda above: (probs * above).sum(axis=0) >= top_p)
        return jnp.where(probs >= jnp.where(top_p < 1, nucleus, 0.0), scaled, -jnp.inf)

    def draw(scaled):
        wants_cut = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
        scaled = jax.lax.cond(wants_cut, cut, lambda x: x, scaled)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled.T)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), best)

    # all-greedy batches skip the random draw (the common case, and the cheaper one)
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: best, scaled)


# --- the compiled steps ---------------------------------------------------------------------


def _prefill_row(weights, cache, row, tokens, valid, graphdef):
    """Feed tokens [1, C] (valid [1, C]) into batch row `row` alone: the row's cache is cut out,
    run at batch 1 and written back in place. Returns (its last valid token's logits [V]
    float32, the cache)."""
    mdl.TRACES["prefill_row"] += 1
    module = nnx.merge(graphdef, weights)

    def cut(x):
        return jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)

    hidden, one = module(jax.tree.map(cut, cache), tokens, valid)
    cache = jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, row, axis=0), cache, one
    )
    return module.logits(mdl.last_valid(hidden, valid))[:, 0], cache


prefill_row = EntryPoint(_prefill_row, static=("graphdef",), donate=("cache",))


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


def _decode_rows(weights, cache, logits, keys, live, n_left, settings, eos_ids, graphdef, block):
    """Up to `block` decode steps of every live row: each samples from its `logits` [B, V] with
    its own key and settings (temperature, top_k, top_p: [B] each; want_top [B] bool: report
    the most likely alternatives), records the token and its log-probability, and is done
    after an EOS id or `n_left` [B] tokens; live rows feed their token for the next logits.
    A row not live keeps its key and logits untouched (what it goes on from when armed again
    or exported), however many steps the other rows take.
    Returns (tokens [B, block] (-1 = none), logprobs [B, block], top ids [B, block, T], top
    logprobs [B, block, T], cache, logits, keys, live, n_left)."""
    mdl.TRACES["decode_rows"] += 1
    module = nnx.merge(graphdef, weights)
    B = logits.shape[0]
    temperature, top_k, top_p, want_top = settings

    def cond(c):
        i, *_, live, _, _ = c
        return (i < block) & jnp.any(live)

    def body(c):
        i, cache, logits, keys, live, n_left, out = c
        split = jax.vmap(jax.random.split)(keys)  # [B, 2]
        # only a live row draws: an idle row's key (and logits, below) wait for its next token
        keys, draw = jnp.where(live, split[:, 0], keys), split[:, 1]
        token = sample_rows(logits.T, draw, temperature, top_k, top_p)
        token = jnp.where(live, token, -1)
        chosen, top_ids, top_values = _logprobs(logits, token, want_top & live)
        out = (
            out[0].at[:, i].set(token),
            out[1].at[:, i].set(chosen),
            out[2].at[:, i].set(top_ids),
            out[3].at[:, i].set(top_values),
        )
        n_left = n_left - live.astype(jnp.int32)
        # every token but an EOS enters the cache (a row stopped by its budget may go on later)
        fed = live & ~jnp.isin(token, eos_ids)
        live = fed & (n_left > 0)
        hidden, cache = module(cache, jnp.maximum(token, 0)[:, None], fed[:, None])
        logits = jnp.where(fed[:, None], module.logits(hidden[:, 0]).T, logits)  # [B, V]
        return i + 1, cache, logits, keys, live, n_left, out

    T = TOP_LOGPROBS
    out = (
        jnp.full((B, block), -1, jnp.int32),
        jnp.zeros((B, block), jnp.float32),
        jnp.zeros((B, block, T), jnp.int32),
        jnp.zeros((B, block, T), jnp.float32),
    )
    init = (jnp.int32(0), cache, logits, keys, live, n_left, out)
    _, cache, logits, keys, live, n_left, out = jax.lax.while_loop(cond, body, init)
    return (*out, cache, logits, keys, live, n_left)


decode_rows = EntryPoint(
    _decode_rows, static=("graphdef", "block"), donate=("cache", "logits", "keys")
)
SETTINGS_DTYPES = (
    jnp.float32,
    jnp.int32,
    jnp.float32,
    jnp.bool_,
)  # temperature, top_k, top_p, want_top


def decode_rows_shardings(mesh, batch: int, block: int, vocab: int, weights, cache):
    """(in, out) shardings of `decode_rows` on `mesh`: every per-row array's rows over `data`,
    given the weights' and the cache's shardings."""
    rows, one = sh.rows(mesh, (batch,)), sh.replicated(mesh)
    logits = sh.rows(mesh, (batch, vocab))
    per_step = sh.rows(mesh, (batch, block))
    per_top = sh.rows(mesh, (batch, block, TOP_LOGPROBS))
    ins = (weights, cache, logits, rows, rows, rows, rows, one)
    outs = (per_step, per_step, per_top, per_top, cache, logits, rows, rows, rows)
    return ins, outs


# --- the host side --------------------------------------------------------------------------


@jax.jit
def _reset_row(pos, epoch, keys, row, seed):
    """A row's position reset to 0 and its key to `seed`'s (jitted: works across processes)."""
    return pos.at[row].set(0), epoch.at[row].set(0), keys.at[row].set(jax.random.key(seed))


@jax.jit
def _set_row(values, row, value):
    return values.at[row].set(value)


def _take_row(cache, logits, keys, row):
    """Row `row`'s state: (its one-row cache, logits [V], PRNG key data)."""

    def cut(x):
        return jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)

    return jax.tree.map(cut, cache), logits[row], jax.random.key_data(keys[row])


def _put_row(cache, logits, keys, row, one, row_logits, key_data):
    """The engine's state with row `row` replaced by a one-row cache, logits and key data."""
    cache = jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), row, axis=0),
        cache,
        one,
    )
    keys = keys.at[row].set(jax.random.wrap_key_data(key_data))
    return cache, logits.at[row].set(row_logits), keys


@dataclasses.dataclass
class RowState:
    """One stream's whole device-side state, out of its row, on the host: what a saved stream
    and an idle session keep (`jaxsink.stream_state`).

    cache: a one-row `KVCache` of numpy arrays (its `pos`/`epoch` are not used: `index` is);
    index: the exact stream index (tokens consumed); logits: [V] float32, the next token's;
    key: the row's PRNG key data (uint32).
    """

    cache: kv.KVCache
    index: int
    logits: np.ndarray
    key: np.ndarray


@dataclasses.dataclass
class Decoded:
    """One decode block's output for one row: token ids, each one's log-probability, and the
    TOP_LOGPROBS most likely (id, log-probability) pairs at each (when the row asked)."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


class Engine:
    """B rows of independent streams over one model: `insert` a stream into a free row (its
    prompt prefilled into that row alone), `decode` a block of steps for every live row,
    `release` a finished row. One compiled prefill (per chunk length) and one compiled decode
    loop serve every row and every mix of settings.

    A stream can also go on: `append` prefills more tokens into a row that stopped (a chat's
    next turn) and decodes again; `export` takes a row's whole state out to the host and
    `restore` puts it into a free row, bit-exact (save/resume, idle sessions). `open` + `feed`
    + `arm` are `insert` in steps, so a long prompt can be fed a chunk at a time between other
    rows' decode blocks.

    stream: the full layers' cache (native sliding layers keep their own); chunk: prefill chunk
    length; block: decode steps per device loop; cache_dtype, mesh: as `jaxsink.generate`.
    """

    def __init__(
        self,
        model: Model,
        batch: int,
        stream: StreamConfig,
        chunk: int = 64,
        block: int = 16,
        cache_dtype=None,
        mesh=None,
    ):
        from jaxsink.evaluate import cache_dtype_of
        from jaxsink.memory import check_cache_fits

        if batch < 1 or chunk < 1 or block < 1:
            raise ConfigError(f"batch, chunk and block must be >= 1, got {batch}, {chunk}, {block}")
        self.model = m = model.on_mesh(mesh)
        cfg, mesh = m.cfg, m.mesh
        check_cache_fits(cfg, stream, batch, m.dtype)
        self.batch, self.stream, self.chunk, self.block = batch, stream, chunk, block
        traces = sum(mdl.TRACES.values())
        notes: set = set()
        self.cache = sh.sharded_cache(cfg, stream, batch, cache_dtype_of(m, cache_dtype), mesh)
        cache_sharding = sh.cache_shardings(self.cache, mesh, notes)
        sh.say(notes)
        one = sh.replicated(mesh)
        rows = sh.rows(mesh, (batch,))
        logits_rows = sh.rows(mesh, (batch, cfg.vocab_size))
        # made in their shardings by jit: device_put of a host value cannot span processes
        self.logits = jax.jit(
            lambda: jnp.zeros((batch, cfg.vocab_size), jnp.float32), out_shardings=logits_rows
        )()
        self.keys = jax.jit(
            lambda: jax.random.split(jax.random.key(0), batch), out_shardings=rows
        )()
        self.live = np.zeros(batch, bool)
        self.n_left = np.zeros(batch, np.int32)
        temperature, top_k, top_p, want_top = (np.zeros(batch, t) for t in SETTINGS_DTYPES)
        self.settings = (temperature, top_k, top_p + 1, want_top)
        self.eos = jnp.asarray(
            cfg.eos_token_ids or (m.tokenizer.eos_token_ids if m.tokenizer else ()) or (-2,),
            jnp.int32,
        )
        self._eos = set(np.asarray(self.eos).tolist())
        tokens = np.zeros((1, chunk), np.int32)
        self._prefill, t_pre = compiled(
            prefill_row,
            "prefill_row",
            (m.weights, self.cache, np.int32(0), tokens, tokens.astype(bool)),
            {"graphdef": m.graphdef},
            (
                (m.weight_shardings, cache_sharding, one, one, one),
                (one, cache_sharding),
            ),
        )
        args = (
            m.weights,
            self.cache,
            self.logits,
            self.keys,
            self.live,
            self.n_left,
            self.settings,
            self.eos,
        )
        self._decode, t_dec = compiled(
            decode_rows,
            "decode_rows",
            args,
            {"graphdef": m.graphdef, "block": block},
            decode_rows_shardings(
                mesh, batch, block, cfg.vocab_size, m.weight_shardings, cache_sharding
            ),
        )
        self.compile_s = t_pre + t_dec
        self.compiles = sum(mdl.TRACES.values()) - traces
        state = (cache_sharding, logits_rows, rows)
        self._take = jax.jit(_take_row)
        self._put = jax.jit(_put_row, donate_argnums=(0, 1, 2), out_shardings=state)
        self.rows: list[RowSampling | None] = [None] * batch
        self.last: Decoded | None = None

    def free_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def _claim(self, sampling: RowSampling) -> int:
        free = self.free_rows()
        if not free:
            raise ConfigError(f"all {self.batch} rows are busy: release one first")
        row = free[0]
        self.rows[row] = sampling
        return row

    def open(self, sampling: RowSampling = RowSampling()) -> int:
        """Claim a free row for a new stream: position 0, key from `sampling.seed`, not live
        until `arm`. Returns the row; ConfigError when no row is free."""
        row = self._claim(sampling)
        cache = self.cache
        pos, epoch, self.keys = _reset_row(
            cache.pos, cache.epoch, self.keys, np.int32(row), np.uint32(sampling.seed)
        )
        self.cache = cache.replace(pos=pos, epoch=epoch)
        return row

    def feeding(self, row: int, ids: Sequence[int]) -> Iterator[int]:
        """Prefill token ids into `row`, continuing its stream, one chunk per step of the
        iterator (it yields the tokens fed so far): a caller can run other rows' decode blocks
        between chunks. The row's next-token logits are set after the last chunk."""
        ids = check_ids(ids, self.model.cfg.vocab_size)
        done = 0
        logits = None
        for tokens, valid, n in padded_chunks(ids, self.chunk):
            logits, self.cache = self._prefill(
                self.model.weights, self.cache, np.int32(row), tokens, valid
            )
            done += n
            if done < len(ids):
                yield done
        self.logits = _set_row(self.logits, np.int32(row), logits)
        yield done

    def feed(self, row: int, ids: Sequence[int]) -> None:
        """Prefill token ids into `row` at once (see `feeding`)."""
        for _ in self.feeding(row, ids):
            pass

    def arm(self, row: int, sampling: RowSampling, logprobs: bool = False) -> None:
        """Make `row` live: it decodes up to `sampling.max_tokens` tokens with these settings
        (its key is kept: the seed acts at `open`). logprobs: report top alternatives."""
        self.rows[row] = sampling
        self.live[row], self.n_left[row] = True, sampling.max_tokens
        values = (sampling.temperature, sampling.top_k, sampling.top_p, logprobs)
        for array, value in zip(self.settings, values, strict=True):
            array[row] = value

    def insert(self, prompt: Sequence[int], sampling: RowSampling = RowSampling()) -> int:
        """Start a stream in a free row: its position reset to 0 and `prompt` (token ids)
        prefilled into it alone. Returns the row. ConfigError when no row is free."""
        ids = check_ids(prompt, self.model.cfg.vocab_size)
        row = self.open(sampling)
        self.feed(row, ids)
        self.arm(row, sampling)
        return row

    def append(self, row: int, ids: Sequence[int], sampling: RowSampling) -> None:
        """Continue a stopped row's stream: prefill `ids` (a chat's next turn) into it, then
        arm it to decode with `sampling`."""
        if self.live[row]:
            raise ConfigError(f"row {row} is still decoding: wait for it to stop")
        self.feed(row, ids)
        self.arm(row, sampling)

    def decode(self, limit: int | None = None) -> list[list[int]]:
        """One block of decode steps for every live row: the new token ids of each row (empty
        for rows not live); their log-probabilities are in `self.last`. A row stops being live
        after an EOS id or its max tokens. limit: at most this many tokens per row now (the
        rows stay live for the rest)."""
        budget = self.n_left if limit is None else np.minimum(self.n_left, limit)
        tokens, logprobs, top_ids, top_values, self.cache, self.logits, self.keys, live, left = (
            self._decode(
                self.model.weights,
                self.cache,
                self.logits,
                self.keys,
                self.live,
                budget,
                self.settings,
                self.eos,
            )
        )
        tokens = sh.to_host(tokens)
        n = (tokens >= 0).sum(axis=1)
        new = [row[:k].tolist() for row, k in zip(tokens, n, strict=True)]
        logprobs = sh.to_host(logprobs)
        wants_top = self.settings[3]
        top_ids, top_values = (
            sh.to_host(x) if wants_top.any() else None for x in (top_ids, top_values)
        )
        self.last = [
            Decoded(
                new[b],
                logprobs[b, : n[b]].tolist(),
                [
                    list(zip(top_ids[b, i].tolist(), top_values[b, i].tolist(), strict=True))
                    for i in range(n[b])
                ]
                if wants_top[b]
                else [],
            )
            for b in range(self.batch)
        ]
        self.n_left = self.n_left - (budget - np.asarray(sh.to_host(left)))
        ended = np.array([bool(r) and r[-1] in self._eos for r in new])
        self.live = np.asarray(sh.to_host(live)) | (self.live & ~ended & (self.n_left > 0))
        return new

    def halt(self, row: int) -> None:
        """Stop a row decoding (a stop string or a client gone); its stream stays in place."""
        self.live[row], self.n_left[row] = False, 0

    def release(self, row: int) -> None:
        """Free a row (finished or abandoned); its slots are reused by the next insert."""
        self.rows[row] = None
        self.live[row] = False

    def positions(self) -> list[int]:
        """Each row's exact stream index."""
        cache = self.cache
        return kv.stream_index(
            cache.replace(pos=sh.to_host(cache.pos), epoch=sh.to_host(cache.epoch))
        )

    def export(self, row: int) -> RowState:
        """Row `row`'s whole state on the host (the row itself is untouched)."""
        one, logits, key = self._take(self.cache, self.logits, self.keys, np.int32(row))
        one = jax.tree.map(sh.to_host, one)
        return RowState(
            cache=one,
            index=self.positions()[row],
            logits=sh.to_host(logits),
            key=sh.to_host(key),
        )

    def restore(self, state: RowState, sampling: RowSampling = RowSampling()) -> int:
        """Put a stream's exported state into a free row, not live until `arm` (or `append`):
        it goes on exactly as if it had never left. ConfigError when its cache layout is not
        this engine's."""

        def layout(layers):
            return jax.tree.structure(layers), [
                (x.shape[1:], x.dtype) for x in jax.tree.leaves(layers)
            ]

        if layout(state.cache.layers) != layout(self.cache.layers):
            raise ConfigError("the saved stream's cache layout is not this engine's")
        pos, epoch = kv.folded_index(self.cache, state.index)
        row = self._claim(sampling)
        one = state.cache.replace(pos=np.full(1, pos, np.int32), epoch=np.full(1, epoch, np.int32))
        self.cache, self.logits, self.keys = self._put(
            self.cache,
            self.logits,
            self.keys,
            np.int32(row),
            one,
            np.asarray(state.logits, np.float32),
            np.asarray(state.key),
        )
        return row
