"""Generation of one stream: the batch engine's B = 1 case (`jaxsink.engine`).

The prompt is prefilled in chunks, then the token loop runs on device (a `lax.while_loop` over a
block of steps, sampling included); the host only sees a block's tokens, detokenizes them and
streams the text out. The engine's executables are compiled once per (config, stream, chunk,
block) and reused, so a prompt of any length and any sampling settings cost no new compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax

from jaxsink import settings
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.engine import check_ids
from jaxsink.loading import Model
from jaxsink.memory import check_cache_fits
from jaxsink.row_text import RowText
from jaxsink.stream_state import SavedStream
from jaxsink.traced import cache as kv


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature 0 = greedy; top_k 0 = no top-k cut; top_p 1 =
    no nucleus cut. Values of the engine's arrays: a change recompiles nothing."""

    temperature: float = settings.SETTINGS["temperature"].default
    top_k: int = settings.SETTINGS["top_k"].default
    top_p: float = settings.SETTINGS["top_p"].default

    def __post_init__(self):
        settings.check({name: getattr(self, name) for name in settings.SAMPLING})


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


class Generation:
    """Iterate to get text pieces as they are produced; then read `.stats` and `.token_ids`,
    and `.saved()` for the stream's whole state (to save it and resume it later)."""

    def __init__(
        self,
        model: Model,
        prompt: str | Sequence[int] | None,
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        mode: str = "sink",
        sinks: int = 4,
        window: int = 1020,
        policy: str = "sink",
        recent: int | None = None,
        chunk: int = 64,
        block: int = 16,
        stop: Sequence[str] = (),
        chat: bool = False,
        cache_dtype: str | None = None,
        mesh=None,
        resume: SavedStream | None = None,
    ):
        settings.check(
            {"max_new_tokens": max_new_tokens, "chunk": chunk, "block": block, "seed": seed}
        )
        tok = model.tokenizer
        if isinstance(prompt, str):
            if not prompt and resume is None:
                raise ConfigError("empty prompt: give some text")
            if chat and prompt:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}])
                prompt = tok.encode(text, add_special_tokens=False)
            else:  # a resumed stream goes on: no second BOS
                prompt = tok.encode(prompt, add_special_tokens=resume is None) if prompt else []
        self.resume = resume
        prompt = list(resume.pending if resume else ()) + list(prompt or ())
        self.prompt_ids = check_ids(prompt, model.cfg.vocab_size) if prompt or not resume else []
        self.model = model.on_mesh(mesh)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.seed = seed
        if resume is None:
            self.cache_dtype = kv.cache_dtype_of(model.dtype, cache_dtype)
            # Dense mode allocates the whole stream, rounded up so nearby lengths share a compile.
            n = len(self.prompt_ids) + max_new_tokens
            dense = -(-n // 256) * 256
            self.stream = StreamConfig.for_mode(mode, sinks, window, dense, policy, recent)
        else:
            self.cache_dtype, self.stream = (
                kv.cache_dtype_of(model.dtype, resume.cache_dtype),
                resume.stream,
            )
            room = self.stream.capacity - resume.row.index - len(self.prompt_ids)
            if not self.stream.wraps and max_new_tokens > room:
                raise ConfigError(
                    f"the resumed dense stream has room for {max(room, 0)} more tokens of its "
                    f"{self.stream.capacity}: ask for fewer (a dense cache cannot grow; a sink "
                    "stream goes on without end)"
                )
        check_cache_fits(model.cfg, self.stream, 1, model.dtype)
        self.chunk = chunk
        self.block = block
        self.stop = tuple(s for s in stop if s)
        self.chat = chat
        self.token_ids: list[int] = []
        self.text = ""
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.cache: kv.KVCache | None = None
        self._engine = None
        self._decoder_state: dict = {}

    def __iter__(self) -> Iterator[str]:
        from jaxsink.engine import Engine, RowSampling

        m, st, s = self.model, self.stats, self.sampling
        engine = Engine(m, 1, self.stream, self.chunk, self.block, self.cache_dtype)
        self._engine = engine
        st.compile_s, st.compiles, st.cache_bytes = (
            engine.compile_s,
            engine.compiles,
            engine.cache.nbytes,
        )
        settings = RowSampling(s.temperature, s.top_k, s.top_p, self.seed, self.max_new_tokens)
        reply = RowText(m.tokenizer, engine.eos_ids, self.stop)
        start = time.perf_counter()
        if self.resume is None:
            engine.insert(self.prompt_ids, settings)
        else:
            row = engine.restore(self.resume.row, settings)
            if len(self.prompt_ids):
                engine.feed(row, self.prompt_ids)
            engine.arm(row, settings)
            reply.decoder.restore(self.resume.decoder)
        jax.block_until_ready(engine.logits)
        st.prefill_s = time.perf_counter() - start

        first_at = None
        while engine.live[0] and not reply.stopped:
            new = engine.decode(limit=1 if first_at is None else None)[0]  # the first alone
            if first_at is None:
                first_at = time.perf_counter()
                st.time_to_first_token_s = first_at - start
            piece = reply.push(new)
            self.token_ids, self.text = reply.tokens, reply.text
            if piece:
                yield piece
        st.stop_reason = reply.reason or "max_new_tokens"
        self._decoder_state = reply.decoder.state()
        piece = reply.finish()
        self.text = reply.text
        if piece:
            yield piece
        jax.block_until_ready(engine.cache)
        st.decode_s = time.perf_counter() - first_at
        st.new_tokens = len(self.token_ids)
        st.stream_position = engine.positions()[0]
        self.cache = engine.cache

    def settings(self) -> dict:
        """The settings of this generation, as JSON values (what a saved stream keeps)."""
        values = {
            name: getattr(self.sampling if name in settings.SAMPLING else self, name)
            for name in settings.SETTINGS
        }
        return values | {"stop": list(self.stop)}

    def saved(self, extra: dict | None = None) -> SavedStream:
        """The stream's whole state once iterated: resuming it (`resume=`) goes on exactly where
        it stopped. A stream stopped by an EOS keeps the EOS as pending: fed first on resume."""
        if self._engine is None:
            raise ConfigError("iterate the generation before saving its stream")
        ended = self.stats.stop_reason == "eos"
        last = self.token_ids[-1] if self.token_ids else None
        return SavedStream(
            row=self._engine.export(0),
            settings=self.settings(),
            decoder=self._decoder_state,
            pending=[last] if ended else [],
            extra=extra or {},
        )


def generate(model: Model, prompt: str | Sequence[int], **kwargs) -> Generation:
    """Stream a continuation of `prompt`: `for text in jaxsink.generate(model, "Hi"): ...`.

    Keyword arguments: max_new_tokens, sampling (Sampling), seed, mode ("sink", "window" or
    "dense"), sinks (default 4), window (default 1020), policy ("sink", "tova" or "h2o": which
    tokens a sink cache keeps) and recent (h2o's recent window, default half the window), chunk (prefill chunk length C), block (decode steps per device loop),
    stop (stop strings), chat (apply the chat template), cache_dtype ("float32", "bfloat16" or
    "int8": int8 ring keys and values with per-token scales, exact sinks), mesh (run sharded on this mesh, see `jaxsink.sharding.make_mesh`), resume (a `SavedStream`:
    go on with that stream, its layout and model; `prompt` is then appended text, or None).
    After iterating, `.stats`, `.token_ids`, `.text`, the final `.cache` and `.saved()` are
    available.
    """
    return Generation(model, prompt, **kwargs)
