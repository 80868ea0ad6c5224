"""What every section runs on: the loaded model, the network a section times, executables
compiled ahead of time, prompt tokens, chunked prefill and the engine's on-device decode loop
timed, and the rows of the results table.

The steps are jaxsink's own entry points (`entry.last_logits` for prefill, `rows.decode_rows`
for decode, compiled by `jaxsink.executables.compiled`) called the way `jaxsink.engine` calls
them, on a plain cache the section makes: no engine around them, so a section can time any
network (random weights, bfloat16 copies) at any cache position.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from measure import timed

from jaxsink.config import ModelConfig, StreamConfig
from jaxsink.engine import padded_chunks
from jaxsink.executables import compiled
from jaxsink.loading import Model
from jaxsink.traced import cache as kv
from jaxsink.traced import entry
from jaxsink.traced.rows import Rows, decode_rows

NO_EOS = -2  # no token is ever -2: every row runs all its steps


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Net:
    """A network a section runs: its config, the module's graph definition (static: a change
    recompiles) and its weights state (an argument of every entry point)."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    weights: nnx.State

    @property
    def dtype(self):
        """The float dtype the network runs in (quantized weights keep their codes)."""
        return self.weights["final_norm"]["scale"][...].dtype

    @classmethod
    def of(cls, model: Model) -> Net:
        """A loaded model's network."""
        return cls(model.cfg, model.graphdef, model.weights)


def traces() -> int:
    """Entry-point traces so far in this process (each one a compilation)."""
    return sum(entry.TRACES.values())


def greedy_rows(cfg: ModelConfig, batch: int, steps: int, logits=None) -> Rows:
    """Per-row state (`Rows`) of `batch` live greedy rows that draw `steps` tokens each, from
    `logits` [B, V] (default zeros)."""
    keys = jax.random.split(jax.random.key(0), batch)
    idle = Rows.idle(batch, cfg.vocab_size, keys)
    return idle.replace(
        logits=idle.logits if logits is None else logits,
        live=np.ones(batch, bool),
        n_left=np.full(batch, steps, np.int32),
    )


def every_row(batch: int) -> np.ndarray:
    """The decode loop's row index of the whole-batch bucket: every row, in order."""
    return np.arange(batch, dtype=np.int32)


def no_eos() -> jax.Array:
    """The EOS ids of a timed decode: none that any token can match."""
    return jnp.asarray([NO_EOS], jnp.int32)


class Harness:
    """One run's model, sizes and transformers worker, and what the sections add to it: the
    compilation seconds, each section's results and the rows of the results table."""

    def __init__(self, args, model: Model, sizes: dict, worker):
        self.args, self.model, self.sizes, self.worker = args, model, sizes, worker
        self.cfg = model.cfg
        self.net = Net.of(model)
        self.compile_s = 0.0
        self.results: dict = {}
        self.rows: list[tuple[str, str, str, str]] = []  # section, measurement, value, note

    @property
    def repeats(self) -> int:
        """Timed runs of a measurement (at least `min_repeats`)."""
        return max(self.sizes["repeats"], self.sizes["min_repeats"])

    def row(self, section: str, what: str, value: str, note: str = "") -> None:
        """One row of the results table."""
        self.rows.append((section, what, value, note))

    def tokens(self, n: int, seed: int = 0, batch: int | None = None, cfg=None) -> np.ndarray:
        """Deterministic prompt ids [n] (or [batch, n]): random ids away from the special tokens
        at the start of the vocabulary."""
        rng = np.random.default_rng(seed)
        shape = (n,) if batch is None else (batch, n)
        return rng.integers(100, (cfg or self.cfg).vocab_size, shape).astype(np.int32)

    def compiled(self, name: str, fn, args: tuple, static: dict):
        """`fn` compiled ahead of time, once per (function, argument shapes/dtypes, static
        args); the seconds spent count in `compile_s`."""
        exe, seconds = compiled(fn, name, args, static)
        self.compile_s += seconds
        return exe

    def init_cache(self, stream: StreamConfig, batch: int = 1, dtype=None) -> kv.KVCache:
        """An empty cache of the run's model for `batch` rows (default dtype: the model's)."""
        return kv.init_cache(self.cfg, stream, batch, dtype or self.model.dtype)

    def prefill(self, net: Net, cache, ids, chunk: int):
        """Feed ids [B, T] in chunks of `chunk` (last one padded); returns (last logits [B, V],
        cache)."""
        ids = np.atleast_2d(ids)
        zeros = np.zeros((ids.shape[0], chunk), np.int32)
        exe = self.compiled(
            "prefill",
            entry.last_logits,
            (net.weights, cache, zeros, zeros.astype(bool)),
            {"graphdef": net.graphdef},
        )
        logits = None
        for tokens, valid, _ in padded_chunks(ids, chunk):
            logits, cache = exe(net.weights, cache, tokens, valid)
        return logits, cache

    def decode_exe(self, net: Net, cache, block: int):
        """The engine's on-device decode loop over every row of this cache (the whole-batch
        bucket), compiled for it, `block` steps max."""
        B = cache.pos.shape[0]
        args = (net.weights, cache, greedy_rows(net.cfg, B, block), every_row(B), no_eos())
        static = {"graphdef": net.graphdef, "block": block}
        return self.compiled("decode_rows", decode_rows, args, static)

    def run_decode(self, exe, net: Net, cache, logits, steps: int):
        """Run `steps` greedy decode steps on copies of (cache, logits) (both are donated).

        Returns (seconds, tokens [B, steps] as numpy, the cache after).
        """
        cache, logits = jax.block_until_ready(jax.tree.map(jnp.copy, (cache, logits)))
        B = cache.pos.shape[0]
        rows = greedy_rows(net.cfg, B, steps, logits)
        (drawn, cache, rows), seconds = timed(exe, net.weights, cache, rows, every_row(B), no_eos())
        left = np.asarray(rows.n_left)
        assert int(left.max()) == 0, f"decode left {left} steps"
        return seconds, np.asarray(drawn.tokens)[:, :steps], cache

    def decode_runs(
        self, net: Net, stream, batch: int, prompt: int, steps: int, cache_dtype=None
    ) -> list:
        """Seconds of each timed run (after a warm-up) of `steps` greedy decode steps of `batch`
        streams, each row prefilled in one chunk with its own `prompt` random tokens; the
        cache in `cache_dtype` (default: the weights')."""
        run = self.decode_setup(net, stream, batch, prompt, steps, cache_dtype)
        return [run() for _ in range(self.repeats)]

    def decode_setup(
        self, net: Net, stream, batch: int, prompt: int, steps: int, cache_dtype
    ) -> Callable[[], float]:
        """`decode_runs`' streams prefilled, compiled and warmed up: a function that times one
        run of `steps` decode steps (seconds)."""
        ids = self.tokens(prompt, seed=4, batch=batch, cfg=net.cfg)
        cache = kv.init_cache(net.cfg, stream, batch, cache_dtype or net.dtype)
        logits, cache = self.prefill(net, cache, ids, min(prompt, 256))
        exe = self.decode_exe(net, cache, steps)
        self.run_decode(exe, net, cache, logits, steps)  # warm-up
        return lambda: self.run_decode(exe, net, cache, logits, steps)[0]
