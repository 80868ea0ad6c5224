"""Streaming perplexity: the exact per-token NLL of a long stream in sink, window or dense mode.

The stream runs in large fixed chunks, yet every token's NLL is the one it gets when fed alone
with its window under the contract (chunks are exact per token): fast and exact at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings

import numpy as np

from jaxsink import sharding as sh
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.engine import padded_chunks
from jaxsink.executables import compiled
from jaxsink.loading import Model
from jaxsink.memory import check_cache_fits
from jaxsink.traced import cache as kv
from jaxsink.traced import entry

SEGMENT = 1024  # tokens per segment in the summary's per-segment perplexity


@dataclasses.dataclass
class StreamResult:
    """One mode's run: per-token NLL [N] in stream order and its figures."""

    mode: str
    nll: np.ndarray
    seconds: float
    compile_seconds: float
    cache_bytes: int
    cache_bytes_all_full: int  # the same cache if no layer kept a native sliding window
    compiles: int
    sinks: int
    window: int
    chunk_seconds: np.ndarray  # [n_chunks] wall time of each chunk, NLL copied to the host
    policy: str = "sink"  # which tokens a sink cache keeps (`StreamConfig.policy`)
    recent: int = 0  # h2o's recent window

    def summary(self) -> dict:
        n = len(self.nll)
        segments = [self.nll[i : i + SEGMENT] for i in range(0, n, SEGMENT)]
        return {
            "mode": self.mode,
            "tokens": n,
            "ppl": float(np.exp(self.nll.mean())),
            "nll_mean": float(self.nll.mean()),
            "segment_tokens": SEGMENT,
            "segment_ppl": [float(np.exp(s.mean())) for s in segments],
            "tokens_per_s": n / self.seconds if self.seconds else 0.0,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "cache_bytes": self.cache_bytes,
            "cache_bytes_all_full": self.cache_bytes_all_full,
            "compiles": self.compiles,
            "sinks": self.sinks,
            "window": self.window,
        } | ({"policy": self.policy, "recent": self.recent} if self.mode == "sink" else {})


def stream_config(
    mode: str,
    sinks: int,
    window: int,
    n_tokens: int,
    chunk: int,
    policy: str = "sink",
    recent: int | None = None,
) -> StreamConfig:
    """The cache of `mode` at capacity sinks + window, keeping its tokens by `policy` (sink
    mode); dense holds the whole stream."""
    dense = -(-n_tokens // chunk) * chunk
    return StreamConfig.for_mode(mode, sinks, window, dense, policy, recent)


def check_stream(model: Model, stream: StreamConfig) -> None:
    """Refuse a cache that would not fit in this machine's memory; warn when a dense stream
    runs past the model's trained context (dense still runs: that is the baseline's point)."""
    check_cache_fits(model.cfg, stream, 1, model.dtype)
    if stream.mode == "dense" and stream.capacity > model.cfg.max_position_embeddings:
        warnings.warn(
            f"dense mode over {stream.capacity} tokens, past the model's trained context "
            f"({model.cfg.max_position_embeddings}): expect perplexity to blow up",
            stacklevel=2,
        )


def stream_nll(
    model: Model,
    ids: np.ndarray,
    mode: str = "sink",
    sinks: int = 4,
    window: int = 1020,
    chunk: int = 128,
    progress: bool = True,
    cache_dtype: str | None = None,
    mesh=None,
    policy: str = "sink",
    recent: int | None = None,
) -> StreamResult:
    """Per-token NLL of the stream `ids` (N + 1 token ids -> N values), fed in chunks of `chunk`.

    The dense cache (capacity = the stream, rounded up to the chunk) is allocated up front;
    a cache too large for the machine's memory is refused before it is.
    cache_dtype: "float32", "bfloat16" or "int8" (default: the model's dtype). mesh: run on this mesh
    (`jaxsink.sharding.make_mesh`'s argument) instead of the model's own. policy, recent: which
    tokens a sink cache keeps (`StreamConfig.policy`; recent: h2o's, default half the window).
    """
    from tqdm import tqdm

    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    n = len(ids) - 1
    if n < 1:
        raise ConfigError("the stream needs at least 2 tokens (one target)")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
        raise ConfigError(f"token ids must be in [0, {model.cfg.vocab_size})")
    stream = stream_config(mode, sinks, window, n, chunk, policy, recent)
    check_stream(model, stream)
    model = model.on_mesh(mesh)
    mesh, notes = model.mesh, set()
    cache = sh.sharded_cache(
        model.cfg, stream, 1, kv.cache_dtype_of(model.dtype, cache_dtype), mesh
    )
    cache_sharding = sh.cache_shardings(cache, mesh, notes)
    sh.say(notes)
    cache_bytes = cache.nbytes
    traces = sum(entry.TRACES.values())
    ids0, valid0 = np.zeros((1, chunk), np.int32), np.zeros((1, chunk), bool)
    args = (model.weights, cache, ids0, ids0, valid0)
    row = sh.rows(mesh, ids0.shape)
    shardings = ((model.weight_shardings, cache_sharding, row, row, row), (row, cache_sharding))
    static = {"graphdef": model.graphdef}
    exe, compile_seconds = compiled(entry.nll_chunk, "nll_chunk", args, static, shardings)

    out = np.zeros(n, np.float32)
    chunk_seconds = []
    # disable=None: tqdm draws only on a terminal, so a log file gets no carriage-return updates
    bar = tqdm(
        total=n, desc=f"ppl {mode}", unit="tok", file=sys.stderr, disable=None if progress else True
    )
    start = time.perf_counter()
    pairs = padded_chunks(np.stack([ids[:-1], ids[1:]]), chunk)  # rows: inputs, targets
    for i, (both, valid, m) in zip(range(0, n, chunk), pairs, strict=True):
        tokens, targets, valid = both[:1], both[1:], valid[:1]
        t0 = time.perf_counter()
        nll, cache = exe(model.weights, cache, tokens, targets, valid)
        out[i : i + m] = sh.to_host(nll)[0, :m]
        chunk_seconds.append(time.perf_counter() - t0)
        bar.update(m)
    bar.close()
    seconds = time.perf_counter() - start
    return StreamResult(
        mode=mode,
        nll=out,
        seconds=seconds,
        compile_seconds=compile_seconds,
        cache_bytes=cache_bytes,
        cache_bytes_all_full=kv.cache_bytes(
            model.cfg, stream, 1, cache.dtype, native_windows=False
        ),
        compiles=sum(entry.TRACES.values()) - traces,
        sinks=stream.sinks,
        window=stream.window,
        chunk_seconds=np.asarray(chunk_seconds),
        policy=stream.policy,
        recent=stream.recent,
    )


def plot(results: list[StreamResult], path: str, title: str = "", bytes_per_token: int = 0) -> None:
    """Log-perplexity against tokens for each mode, with cache memory on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    mem_ax = ax.twinx()
    step = 128
    for r in results:
        n = len(r.nll) // step * step
        if n == 0:
            continue
        log_ppl = r.nll[:n].reshape(-1, step).mean(axis=1)
        x = np.arange(1, n // step + 1) * step
        (line,) = ax.plot(x, log_ppl, label=f"{r.mode} (ppl {np.exp(r.nll.mean()):.2f})")
        if r.mode == "dense" and bytes_per_token:
            memory = np.minimum(x, r.window) * bytes_per_token / 2**20  # what dense holds at x
        else:
            memory = np.full(len(x), r.cache_bytes / 2**20)
        mem_ax.plot(x, memory, linestyle=":", color=line.get_color())
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"log perplexity (mean NLL per {step} tokens)")
    mem_ax.set_ylabel("KV cache memory (MiB, dotted)")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
