"""Generation over the sink + ring cache: chunked prefill, then a jitted decode loop.

The token loop runs on device (`lax.while_loop` over a block of steps, sampling included); the
host only sees a block's tokens, detokenizes them and streams the text out. Executables are
compiled ahead of time once per (config, stream, batch, chunk, block, sampling) and reused, so a
prompt of any length costs the same compilations.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink import cache as kv
from jaxsink import model as mdl
from jaxsink import sharding as sh
from jaxsink.config import ConfigError, ModelConfig, StreamConfig
from jaxsink.evaluate import cache_dtype_of
from jaxsink.executables import EntryPoint, compiled
from jaxsink.loading import Model
from jaxsink.memory import check_cache_fits
from jaxsink.tokenizer import IncrementalDecoder


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn (static: a change recompiles). temperature 0 = greedy;
    top_k 0 = no top-k cut; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")


def _nucleus(logits: jax.Array, top_p: float, iterations: int = 40) -> jax.Array:
    """Mask (to -inf) every token outside the smallest set of best tokens whose probability
    mass reaches `top_p`. logits: [B, V] in any order.

    Finds the nucleus threshold by bisection on the probability value instead of sorting the
    vocabulary (a full sort costs more than a decode step on CPU): after 40 halvings of [0, 1]
    the threshold sits within 1e-12 below the exact one, closer than distinct float32
    probabilities of any token that matters.
    """
    probs = jax.nn.softmax(logits, axis=-1)

    def mass_at_least(t):  # [B] -> [B]
        return jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: mass_at_least(lo) >= top_p
        mid = (lo + hi) / 2
        ok = mass_at_least(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    best = probs.max(axis=-1)
    lo, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(best), best))
    threshold = jnp.where(mass_at_least(best) >= top_p, best, lo)
    return jnp.where(probs >= threshold[:, None], logits, -jnp.inf)


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


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling, axis: int = -1) -> jax.Array:
    """Draw one token per row. logits: [B, V] float32 (or [V, B] with axis 0) -> [B] int32."""
    if sampling.temperature == 0:
        return greedy(logits, axis)
    logits = jnp.moveaxis(logits, axis, -1) / sampling.temperature
    idx = None
    if sampling.top_k:
        logits, idx = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))  # [B, k]
    if sampling.top_p < 1:
        logits = _nucleus(logits, sampling.top_p)
    choice = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


def _decode_block(weights, cache, logits, key, done, n_left, eos_ids, graphdef, sampling, block):
    """Up to min(block, n_left) decode steps on device.

    Each step samples a token from `logits` [B, V], records it, and (for rows not finished)
    feeds it to the model for the next logits. Rows that sampled an EOS id are `done` and stop
    consuming stream positions. Returns (tokens [B, block] (-1 = none), steps, cache, logits,
    key, done).
    """
    mdl.TRACES["decode_block"] += 1
    module = nnx.merge(graphdef, weights)
    B = logits.shape[0]
    logits = logits.T  # [V, B]: `Decoder.logits`' layout

    def cond(c):
        i, *_, done, _ = c
        return (i < jnp.minimum(block, n_left)) & ~jnp.all(done)

    def body(c):
        i, cache, logits, key, done, out = c
        key, sub = jax.random.split(key)
        token = jnp.where(done, -1, sample(logits, sub, sampling, axis=0))  # [B]
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, eos_ids)
        live = (~done)[:, None]  # [B, 1]
        hidden, cache = module(cache, jnp.maximum(token, 0)[:, None], live)
        return i + 1, cache, module.logits(hidden[:, 0]), key, done, out

    init = (jnp.int32(0), cache, logits, key, done, jnp.full((B, block), -1, jnp.int32))
    i, cache, logits, key, done, out = jax.lax.while_loop(cond, body, init)
    return out, i, cache, logits.T, key, done


decode_block = EntryPoint(
    _decode_block,
    static=("graphdef", "sampling", "block"),
    donate=("cache", "logits"),
    doc="Jitted `_decode_block`.",
)


@dataclasses.dataclass
class GenerationStats:
    """Figures of one generation; timings exclude compilation."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    compile_s: float = 0.0
    compiles: int = 0
    cache_bytes: int = 0
    stream_position: int = 0
    stop_reason: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prefill_tokens_per_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        # The first token comes from the prefill logits; the rest from decode steps.
        steps = max(self.new_tokens - 1, 0)
        d["decode_tokens_per_s"] = steps / self.decode_s if self.decode_s else 0.0
        return d


def _check_prompt(ids: Sequence[int], cfg: ModelConfig) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ConfigError("empty prompt: give at least one token")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        bad = int(arr[(arr < 0) | (arr >= cfg.vocab_size)][0])
        raise ConfigError(f"token id {bad} is out of range [0, {cfg.vocab_size})")
    return arr.astype(np.int32)


class Generation:
    """Iterate to get text pieces as they are produced; then read `.stats` and `.token_ids`."""

    def __init__(
        self,
        model: Model,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        mode: str = "sink",
        sinks: int = 4,
        window: int = 1020,
        chunk: int = 64,
        block: int = 16,
        stop: Sequence[str] = (),
        chat: bool = False,
        cache_dtype: str | None = None,
        mesh=None,
    ):
        if max_new_tokens < 1:
            raise ConfigError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}")
        if block < 1:
            raise ConfigError(f"block must be >= 1, got {block}")
        tok = model.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("empty prompt: give some text")
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}])
                prompt = tok.encode(text, add_special_tokens=False)
            else:
                prompt = tok.encode(prompt)
        self.prompt_ids = _check_prompt(prompt, model.cfg)
        self.model = model.on_mesh(mesh)
        self.cache_dtype = cache_dtype_of(model, cache_dtype)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.seed = seed
        # Dense mode allocates the whole stream, rounded up so nearby lengths share a compile.
        n = len(self.prompt_ids) + max_new_tokens
        self.stream = StreamConfig.for_mode(mode, sinks, window, dense_capacity=-(-n // 256) * 256)
        check_cache_fits(model.cfg, self.stream, 1, model.dtype)
        self.chunk = chunk
        self.block = block
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.cache: kv.KVCache | None = None

    def __iter__(self) -> Iterator[str]:
        m, cfg, st = self.model, self.model.cfg, self.stats
        traces_before = sum(mdl.TRACES.values())
        mesh, notes = m.mesh, set()
        cache = sh.sharded_cache(cfg, self.stream, 1, self.cache_dtype, mesh)
        cache_sharding = sh.cache_shardings(cache, mesh, notes)
        sh.say(notes)
        st.cache_bytes = cache.nbytes
        C = self.chunk
        tokens = np.zeros((1, C), np.int32)
        valid = np.zeros((1, C), bool)
        row, logits_rows, one = (
            sh.rows(mesh, (1, C)),
            sh.rows(mesh, (1, cfg.vocab_size)),
            sh.replicated(mesh),
        )
        shardings = ((m.weight_shardings, cache_sharding, row, row), (logits_rows, cache_sharding))
        prefill, t_pre = compiled(
            mdl.last_logits,
            "prefill",
            (m.weights, cache, tokens, valid),
            {"graphdef": m.graphdef},
            shardings,
        )
        eos = jnp.asarray(cfg.eos_token_ids or m.tokenizer.eos_token_ids or (-2,), jnp.int32)
        key = jax.random.key(self.seed)
        done = jnp.zeros((1,), bool)
        logits0 = jnp.zeros((1, cfg.vocab_size), jnp.float32)
        block_args = (m.weights, cache, logits0, key, done, jnp.int32(1), eos)
        static = {"graphdef": m.graphdef, "sampling": self.sampling, "block": self.block}
        flags = sh.rows(mesh, (1,))
        shardings = (
            (m.weight_shardings, cache_sharding, logits_rows, one, flags, one, one),
            (sh.rows(mesh, (1, self.block)), one, cache_sharding, logits_rows, one, flags),
        )
        block_fn, t_blk = compiled(decode_block, "decode_block", block_args, static, shardings)
        st.compile_s = t_pre + t_blk
        st.compiles = sum(mdl.TRACES.values()) - traces_before

        start = time.perf_counter()
        ids = self.prompt_ids
        for i in range(0, len(ids), C):
            part = ids[i : i + C]
            tokens = np.zeros((1, C), np.int32)
            tokens[0, : len(part)] = part
            valid = np.zeros((1, C), bool)
            valid[0, : len(part)] = True
            logits, cache = prefill(m.weights, cache, tokens, valid)
        jax.block_until_ready(logits)
        st.prefill_s = time.perf_counter() - start

        decoder = IncrementalDecoder(m.tokenizer, skip_special_tokens=True)
        first_at = None
        remaining = self.max_new_tokens
        st.stop_reason = "max_new_tokens"
        while remaining > 0:
            n_left = jnp.int32(1 if first_at is None else min(self.block, remaining))
            out, steps, cache, logits, key, done = block_fn(
                m.weights, cache, logits, key, done, n_left, eos
            )
            # Host-side indexing only: slicing device arrays would compile per distinct shape.
            new = [int(x) for x in sh.to_host(out)[0, : int(steps)] if x >= 0]
            if first_at is None:
                first_at = time.perf_counter()
                st.time_to_first_token_s = first_at - start
            remaining -= len(new)
            self.token_ids.extend(new)
            piece = decoder.push(new)
            piece, stopped = self._cut_at_stop(piece)
            if piece:
                yield piece
            if stopped:
                st.stop_reason = "stop_string"
                break
            if sh.to_host(done)[0]:
                st.stop_reason = "eos"
                break
            if not new:
                break
        if st.stop_reason != "stop_string":
            piece, _ = self._cut_at_stop(decoder.flush())
            if piece:
                yield piece
        jax.block_until_ready(cache)
        st.decode_s = time.perf_counter() - first_at
        st.new_tokens = len(self.token_ids)
        st.stream_position = kv.stream_index(
            cache.replace(pos=sh.to_host(cache.pos), epoch=sh.to_host(cache.epoch))
        )[0]
        self.cache = cache

    def _cut_at_stop(self, piece: str) -> tuple[str, bool]:
        """Append `piece` to the text, cut at the first stop string; (text to emit, stopped)."""
        before = len(self.text)
        self.text += piece
        hits = [self.text.find(s, max(0, before - len(s) + 1)) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return piece, False
        self.text = self.text[: min(hits)]
        return self.text[before:], True


def generate(model: Model, prompt: str | Sequence[int], **kwargs) -> Generation:
    """Stream a continuation of `prompt`: `for text in jaxsink.generate(model, "Hi"): ...`.

    Keyword arguments: max_new_tokens, sampling (Sampling), seed, mode ("sink", "window" or
    "dense"), sinks (default 4), window (default 1020), chunk (prefill chunk length C), block (decode steps per device loop),
    stop (stop strings), chat (apply the chat template), cache_dtype ("float32" or "bfloat16"),
    mesh (run sharded on this mesh, see `jaxsink.sharding.make_mesh`). After iterating, `.stats`,
    `.token_ids`, `.text` and the final `.cache` are available.
    """
    return Generation(model, prompt, **kwargs)
