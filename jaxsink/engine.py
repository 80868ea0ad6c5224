"""The batch engine: B rows, each an independent endless stream, in one compiled prefill and one
compiled decode loop.

A stream is inserted into a free row: the row's position is reset (its old slots become
invisible: a slot is seen only if it holds a token of the row's current stream) and its prompt
is prefilled in chunks. Every step runs only the rows it needs: they are gathered out of the
cache into a batch of the smallest bucket that holds them (1, 2, 4, ... up to B rows, each
bucket compiled once), run, and scattered back in place; the B-row bucket runs the cache as
it is. A prefill step feeds one chunk into each of several rows at once; a decode block runs
the live rows; a mixed step runs one decode step of every row and a prefill step in one pass
(`Decoder.segments`), reading each weight once for both. Sampling settings are per row and
are arrays, not static arguments, so requests with different settings share one executable.
A finished row is released. None of this recompiles past the buckets or touches the other
rows.

`jaxsink.generate` is the B = 1 case of this engine.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsink import settings
from jaxsink import sharding as sh
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.executables import compiled
from jaxsink.loading import Model
from jaxsink.traced import cache as kv
from jaxsink.traced.entry import TRACES
from jaxsink.traced.rows import (
    TOP_LOGPROBS,
    Drawn,
    Rows,
    decode_rows,
    mixed_rows,
    prefill_rows,
    put_row,
    reset_row,
    take_row,
)


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


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One stream's sampling settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off;
    max_tokens: new tokens at most; stop: strings that end the text (checked on the host)."""

    temperature: float = settings.SETTINGS["temperature"].default
    top_k: int = settings.SETTINGS["top_k"].default
    top_p: float = settings.SETTINGS["top_p"].default
    seed: int = settings.SETTINGS["seed"].default
    max_tokens: int = settings.SETTINGS["max_new_tokens"].default
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        values = {name: getattr(self, name) for name in (*settings.SAMPLING, "seed")}
        settings.check(
            values | {"max_new_tokens": self.max_tokens}, {"max_new_tokens": "max tokens"}
        )


# --- the compiled steps ---------------------------------------------------------------------


def buckets(batch: int) -> tuple[int, ...]:
    """The row counts a step is compiled for: 1, 2, 4, ... below `batch`, then `batch`
    (ceil(log2 batch) + 1 of them)."""
    out = [1 << k for k in range(batch.bit_length()) if 1 << k < batch]
    return (*out, batch)


def bucket_of(n: int, batch: int) -> int:
    """The smallest bucket of `batch` rows that holds `n` rows."""
    return next(b for b in buckets(batch) if b >= n)


def token_buckets(chunk: int) -> tuple[int, ...]:
    """The tokens per row a prefill step is compiled for: half a chunk and a whole one (a
    prompt's last piece, or a turn's few new tokens, pays for half a chunk's compute, not a
    whole one's)."""
    return tuple(sorted({max(1, chunk // 2), chunk}))


def rows_shardings(mesh, batch: int, vocab: int) -> Rows:
    """Every per-row array's rows over `data` (`Rows` of shardings)."""
    flags = sh.rows(mesh, (batch,))
    return Rows(sh.rows(mesh, (batch, vocab)), *(flags,) * 7)


def decode_rows_shardings(mesh, batch: int, bucket: int, block: int, vocab: int, weights, cache):
    """(in, out) shardings of `decode_rows` on `mesh` for a `bucket` of `batch` rows: every
    per-row array's rows over `data`, given the weights' and the cache's shardings."""
    rows, one = rows_shardings(mesh, batch, vocab), sh.replicated(mesh)
    return (weights, cache, rows, one, one), (_drawn_shardings(mesh, bucket, block), cache, rows)


def mixed_rows_shardings(mesh, batch: int, vocab: int, weights, cache):
    """(in, out) shardings of `mixed_rows` on `mesh` (as `decode_rows_shardings`)."""
    rows, one = rows_shardings(mesh, batch, vocab), sh.replicated(mesh)
    ins = (weights, cache, rows, one, one, one, one)
    return ins, (_drawn_shardings(mesh, batch, 1), cache, rows)


def _drawn_shardings(mesh, bucket: int, block: int) -> Drawn:
    per_step = sh.rows(mesh, (bucket, block))
    per_top = sh.rows(mesh, (bucket, block, TOP_LOGPROBS))
    return Drawn(per_step, per_step, per_top, per_top)


# --- the host side --------------------------------------------------------------------------


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
    prompt prefilled), `decode` a block of steps for every live row, `release` a finished row.
    Each step runs the smallest bucket of rows (`buckets`) that holds the rows it needs; one
    compiled prefill (per bucket) and one compiled decode loop (per bucket) serve every row and
    every mix of settings.

    A stream can also go on: `append` prefills more tokens into a row that stopped (a chat's
    next turn) and decodes again; `export` takes a row's whole state out to the host and
    `restore` puts it into a free row, bit-exact (save/resume, idle sessions). `open` + `feed`
    + `arm` are `insert` in steps, and `prefill` feeds a chunk into each of several rows in one
    step, so a server feeds many prompts a chunk at a time between other rows' decode blocks.

    stream: the full layers' cache (native sliding layers keep their own); chunk: prefill chunk
    length; block: decode steps per device loop; cache_dtype, mesh: as `jaxsink.generate`.
    The B-row buckets are compiled at construction (`compile_s`, `compiles`), smaller ones at
    their first use or by `warm`.
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
        from jaxsink.memory import check_cache_fits

        if batch < 1 or chunk < 1 or block < 1:
            raise ConfigError(f"batch, chunk and block must be >= 1, got {batch}, {chunk}, {block}")
        self.model = m = model.on_mesh(mesh)
        cfg, mesh = m.cfg, m.mesh
        check_cache_fits(cfg, stream, batch, m.dtype)
        self.batch, self.stream, self.chunk, self.block = batch, stream, chunk, block
        notes: set = set()
        self.cache = sh.sharded_cache(
            cfg, stream, batch, kv.cache_dtype_of(m.dtype, cache_dtype), mesh
        )
        self._cache_sharding = sh.cache_shardings(self.cache, mesh, notes)
        sh.say(notes)
        self._row_shardings = rows_shardings(mesh, batch, cfg.vocab_size)
        # made in their shardings by jit: device_put of a host value cannot span processes
        self.logits = jax.jit(
            lambda: jnp.zeros((batch, cfg.vocab_size), jnp.float32),
            out_shardings=self._row_shardings.logits,
        )()
        self.keys = jax.jit(
            lambda: jax.random.split(jax.random.key(0), batch),
            out_shardings=self._row_shardings.keys,
        )()
        idle = Rows.idle(batch, cfg.vocab_size, self.keys)
        self.live, self.n_left = idle.live, idle.n_left
        self.settings = (idle.temperature, idle.top_k, idle.top_p, idle.want_top)
        self.eos = jnp.asarray(
            cfg.eos_token_ids or (m.tokenizer.eos_token_ids if m.tokenizer else ()) or (-2,),
            jnp.int32,
        )
        self.eos_ids = frozenset(np.asarray(self.eos).tolist())
        self._prefills: dict[tuple[int, int], object] = {}
        self._decodes: dict[int, object] = {}
        self._mixes: dict[tuple[int, int], object] = {}
        traces = sum(TRACES.values())
        self.compile_s = self._prefill_exe(1, chunk) + self._decode_exe(batch)
        self.compiles = sum(TRACES.values()) - traces
        state = (self._cache_sharding, self._row_shardings.logits, self._row_shardings.keys)
        self._take = jax.jit(take_row, static_argnames="slots")
        self._put = jax.jit(put_row, donate_argnums=(0, 1, 2), out_shardings=state)
        self.rows: list[RowSampling | None] = [None] * batch
        self.last: list[Decoded] | None = None
        # device steps run, by kind ("prefill", "decode" blocks, "mixed"), `warm`'s not counted
        self.steps: collections.Counter = collections.Counter()

    # --- the executables, one per bucket ---------------------------------------------------

    def _prefill_exe(self, bucket: int, length: int) -> float:
        """Compile the prefill step of `bucket` rows of `length` tokens unless it is; returns
        the seconds spent."""
        if (bucket, length) in self._prefills:
            return 0.0
        m, one, rows = self.model, sh.replicated(self.model.mesh), self._row_shardings
        tokens = np.zeros((bucket, length), np.int32)
        self._prefills[bucket, length], seconds = compiled(
            prefill_rows,
            "prefill_rows",
            (m.weights, self.cache, self.logits, np.zeros(bucket, np.int32), tokens, tokens > 0),
            {"graphdef": m.graphdef},
            (
                (m.weight_shardings, self._cache_sharding, rows.logits, one, one, one),
                (self._cache_sharding, rows.logits),
            ),
        )
        return seconds

    def _decode_exe(self, bucket: int) -> float:
        """Compile the decode loop of `bucket` rows unless it is; returns seconds spent."""
        if bucket in self._decodes:
            return 0.0
        m = self.model
        args = (m.weights, self.cache, self._rows(), np.zeros(bucket, np.int32), self.eos)
        self._decodes[bucket], seconds = compiled(
            decode_rows,
            "decode_rows",
            args,
            {"graphdef": m.graphdef, "block": self.block},
            decode_rows_shardings(
                m.mesh,
                self.batch,
                bucket,
                self.block,
                m.cfg.vocab_size,
                m.weight_shardings,
                self._cache_sharding,
            ),
        )
        return seconds

    def _mixed_exe(self, bucket: int, length: int) -> float:
        """Compile the mixed step (every row's decode step with a prefill of `bucket` rows of
        `length` tokens) unless it is; returns the seconds spent."""
        if (bucket, length) in self._mixes:
            return 0.0
        m = self.model
        tokens = np.zeros((bucket, length), np.int32)
        args = (m.weights, self.cache, self._rows(), np.zeros(bucket, np.int32), tokens)
        self._mixes[bucket, length], seconds = compiled(
            mixed_rows,
            "mixed_rows",
            (*args, tokens > 0, self.eos),
            {"graphdef": m.graphdef},
            mixed_rows_shardings(
                m.mesh, self.batch, m.cfg.vocab_size, m.weight_shardings, self._cache_sharding
            ),
        )
        return seconds

    def warm(self, prefill_rows: int | None = None) -> float:
        """Compile every bucket's decode, and prefill and mixed steps (`step`) for each token
        bucket and each row bucket up to the one holding `prefill_rows` (default: all), and
        run each once on the free rows, now (a server, before its first request; every row
        must be free); returns the seconds spent.

        Running matters as much as compiling on XLA:CPU: an executable's first run is 2-4x
        slower than the next (the first touch of its buffers), which a burst of requests would
        otherwise pay once per bucket. The runs write only free rows, whose streams `open`
        starts again."""
        if any(r is not None for r in self.rows):
            raise ConfigError("warm the engine before any row is in use")
        start = time.perf_counter()
        most = bucket_of(min(prefill_rows or self.batch, self.batch), self.batch)
        for b in [b for b in buckets(self.batch) if b <= most]:
            for n in token_buckets(self.chunk):
                self.prefill({row: [0] * n for row in range(b)})
                self._mixed({row: [0] * n for row in range(b)})
        for b in buckets(self.batch):
            self._decode_exe(b)
            rows = self._rows(np.ones(self.batch, np.int32)).replace(live=np.arange(self.batch) < b)
            _, self.cache, rows = self._decodes[b](
                self.model.weights, self.cache, rows, self._bucket(list(range(b))), self.eos
            )
            self.logits, self.keys = rows.logits, rows.keys
        for slots in {self._filled_slots(i) for i in range(self.stream.capacity + 1)}:
            self._take(self.cache, self.logits, self.keys, np.int32(0), slots)  # `export`s
        zero = jax.jit(jnp.zeros_like)
        self.cache = self.cache.replace(pos=zero(self.cache.pos), epoch=zero(self.cache.epoch))
        self.steps.clear()
        jax.block_until_ready(self.cache)
        return time.perf_counter() - start

    def _rows(self, n_left: np.ndarray | None = None) -> Rows:
        temperature, top_k, top_p, want_top = self.settings
        n_left = self.n_left if n_left is None else n_left
        return Rows(self.logits, self.keys, self.live, n_left, temperature, top_k, top_p, want_top)

    def _bucket(self, wanted: list[int], steps: int | None = None, whole=True) -> np.ndarray:
        """The rows of the smallest bucket holding `wanted` (distinct rows), `wanted` first,
        then padding (index B, past the last row: see `_gathered`); every row in order when
        the bucket is the whole batch, unless `whole` is False (a mixed step's prefill rows,
        which must not write back the rows they do not feed).

        steps: the decode steps the bucket is for. Gathering b rows and scattering them back
        moves each of their caches about four times (read and write, out and in), where a
        decode step reads it once: for fewer than 4 b / (B - b) steps the whole batch, which
        reads every row once a step but copies nothing, is cheaper (measured on SmolLM2 with
        16 rows: one step of 8 gathered rows 0.22 s, of all 16 rows 0.11 s)."""
        size = bucket_of(len(wanted), self.batch)
        if steps is not None and steps * (self.batch - size) <= 4 * size:
            size = self.batch
        if size == self.batch and whole:
            return np.arange(self.batch, dtype=np.int32)
        return np.asarray(wanted + [self.batch] * (size - len(wanted)), np.int32)

    # --- rows ----------------------------------------------------------------------------

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
        pos, epoch, self.keys = reset_row(
            cache.pos, cache.epoch, self.keys, np.int32(row), np.uint32(sampling.seed)
        )
        self.cache = cache.replace(pos=pos, epoch=epoch)
        return row

    def prefill(self, feeds: dict[int, Sequence[int]]) -> None:
        """One prefill step: each row's token ids (1 to `chunk` of them, checked) fed into its
        stream, in the smallest bucket of rows and of tokens per row (`token_buckets`) holding
        them; each row's next-token logits are then its last token's."""
        index, tokens, valid = self._feed_batch(feeds)
        self._prefill_exe(*tokens.shape)
        self.steps["prefill"] += 1
        self.cache, self.logits = self._prefills[tokens.shape](
            self.model.weights, self.cache, self.logits, index, tokens, valid
        )

    def _feed_batch(self, feeds: dict[int, Sequence[int]], whole=True):
        """A prefill step's arguments: (rows `index` [b], tokens [b, T], valid [b, T]) in the
        smallest bucket of rows and of tokens per row holding `feeds` (ids checked; `whole`:
        as `_bucket`)."""
        if not 0 < len(feeds) <= self.batch:
            raise ConfigError(f"a prefill step feeds 1 to {self.batch} rows, got {len(feeds)}")
        index = self._bucket(list(feeds), whole=whole)
        longest = max(len(ids) for ids in feeds.values())
        length = next((n for n in token_buckets(self.chunk) if n >= longest), self.chunk)
        tokens = np.zeros((len(index), length), np.int32)
        valid = np.zeros((len(index), length), bool)
        for i, row in enumerate(index.tolist()):
            if row not in feeds:
                continue
            ids = check_ids(feeds[row], self.model.cfg.vocab_size)
            if len(ids) > self.chunk:
                raise ConfigError(f"a prefill step feeds at most {self.chunk} tokens per row")
            tokens[i, : len(ids)], valid[i, : len(ids)] = ids, True
        return index, tokens, valid

    def feeding(self, row: int, ids: Sequence[int]) -> Iterator[int]:
        """Prefill token ids into `row`, continuing its stream, one chunk per step of the
        iterator (it yields the tokens fed so far): a caller can run other rows' decode blocks
        between chunks. The row's next-token logits are set by the last chunk."""
        ids = check_ids(ids, self.model.cfg.vocab_size)
        for done in range(0, len(ids), self.chunk):
            self.prefill({row: ids[done : done + self.chunk]})
            yield min(done + self.chunk, len(ids))

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
        prefilled into it. Returns the row. ConfigError when no row is free."""
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
        """One block of decode steps for every live row, run in the smallest bucket that holds
        them: the new token ids of each row (empty for rows not live); their log-probabilities
        are in `self.last`. A row stops being live after an EOS id or its max tokens. limit: at
        most this many tokens per row now (the rows stay live for the rest)."""
        live = np.flatnonzero(self.live).tolist()
        if not live:
            return self._drew(None, None, None)
        budget = self.n_left if limit is None else np.minimum(self.n_left, limit)
        index = self._bucket(live, min(self.block, int(budget[live].max())))
        self._decode_exe(len(index))
        self.steps["decode"] += 1
        drawn, self.cache, rows = self._decodes[len(index)](
            self.model.weights, self.cache, self._rows(budget), index, self.eos
        )
        return self._drew(drawn, rows, index)

    def step(self, feeds: dict[int, Sequence[int]]) -> list[list[int]]:
        """One decode step of every live row and one prefill step of `feeds` (as `prefill`
        takes them; rows not live): a server's step while prompts wait. When a one-step decode
        would run the whole batch anyway (`_bucket`), both run in one pass, the mixed step,
        which reads each weight once for both; otherwise the live rows' bucket, then the
        prefill. Returns `decode`'s new token ids (at most one per row); the fed rows'
        next-token logits are their last tokens'."""
        if any(self.live[row] for row in feeds):
            raise ConfigError("a row being fed must not be decoding")
        live = np.flatnonzero(self.live).tolist()
        if not live:
            self.prefill(feeds)
            return self._drew(None, None, None)
        if len(self._bucket(live, steps=1)) == self.batch:
            return self._mixed(feeds)
        # Few live rows: their own small bucket, then the prefill, is cheaper than the mixed
        # step's decode of the whole batch (SmolLM2, 16 rows, 1 live row beside a 64-token
        # prompt: 0.24 against 0.26-0.33 s; 4 live rows: 0.28 against 0.24 s).
        new = self.decode(limit=1)
        self.prefill(feeds)
        return new

    def _mixed(self, feeds: dict[int, Sequence[int]]) -> list[list[int]]:
        """`step` in the mixed executable, whichever rows are live (none of `feeds`')."""
        index, tokens, valid = self._feed_batch(feeds, whole=False)
        self._mixed_exe(*tokens.shape)
        self.steps["mixed"] += 1
        drawn, self.cache, rows = self._mixes[tokens.shape](
            self.model.weights, self.cache, self._rows(), index, tokens, valid, self.eos
        )
        return self._drew(drawn, rows, np.arange(self.batch, dtype=np.int32))

    def _drew(self, drawn: Drawn | None, rows: Rows | None, index) -> list[list[int]]:
        """Take a decode step's results (`Drawn` of the rows `index`, the new `Rows`) to the
        host: each row's new token ids, their log-probabilities into `self.last`, and which
        rows stay live."""
        new: list[list[int]] = [[] for _ in range(self.batch)]
        self.last = [Decoded([], [], []) for _ in range(self.batch)]
        if drawn is None:
            return new
        self.logits, self.keys = rows.logits, rows.keys
        tokens, logprobs = sh.to_host(drawn.tokens), sh.to_host(drawn.logprobs)
        wants_top = self.settings[3][np.minimum(index, self.batch - 1)] & (index < self.batch)
        top_ids, top_values = (
            (sh.to_host(drawn.top_ids), sh.to_host(drawn.top_logprobs))
            if wants_top.any()
            else (None, None)
        )
        for i, row in enumerate(index.tolist()):
            if row == self.batch:  # padding
                continue
            n = int((tokens[i] >= 0).sum())
            new[row] = tokens[i, :n].tolist()
            top = (
                [
                    list(zip(top_ids[i, j].tolist(), top_values[i, j].tolist(), strict=True))
                    for j in range(n)
                ]
                if wants_top[i]
                else []
            )
            self.last[row] = Decoded(new[row], logprobs[i, :n].tolist(), top)
        drawn_now = np.array([len(t) for t in new], np.int32)
        self.n_left = self.n_left - drawn_now
        ended = np.array([bool(t) and t[-1] in self.eos_ids for t in new])
        self.live = self.live & ~ended & (self.n_left > 0)
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

    def export(self, row: int, filled_only: bool = False) -> RowState:
        """Row `row`'s whole state on the host (the row itself is untouched). filled_only: its
        cache keeps only the slots its tokens fill, rounded up to a power of two (a state
        `jaxsink.prompt_cache` pads back; the copy out of the row is that much smaller)."""
        index = self.positions()[row]
        slots = self._filled_slots(index) if filled_only else None
        one, logits, key = self._take(self.cache, self.logits, self.keys, np.int32(row), slots)
        return RowState(
            cache=jax.tree.map(sh.to_host, one),
            index=index,
            logits=sh.to_host(logits),
            key=sh.to_host(key),
        )

    def _filled_slots(self, index: int) -> int | None:
        """The slots `export(filled_only=True)` keeps of a stream of `index` tokens: a power of
        two holding them (a bounded number of compiles), or None (all) once the cache is
        full."""
        return 1 << max(index - 1, 0).bit_length() if index < self.stream.capacity else None

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
