"""The prompt cache of stream states: a request whose ids begin with a cached prefix starts
from that state and gives the uncached tokens (greedy and sampled with the same seed) and
logits within 1e-5, from the end of a prompt, the end of a reply and the end of a chat's
system message; `cached_tokens` says how many ids it spared; no state reaches a request it is
not a true prefix of; the byte bound holds and evicts the least recently used."""

from __future__ import annotations

import queue

import numpy as np
import pytest

import jaxsink
from jaxsink.config import StreamConfig
from jaxsink.engine import Engine, RowSampling, RowState
from jaxsink.prompt_cache import PromptCache, state_bytes
from jaxsink.scheduler import Job, Scheduler
from tests.support.tiny import chat_checkpoint

STREAM = StreamConfig(2, 13)
CHUNK, BLOCK = 4, 3
GREEDY = RowSampling(max_tokens=8)
SAMPLED = RowSampling(temperature=0.9, top_p=0.9, seed=7, max_tokens=9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return jaxsink.load(chat_checkpoint(tmp_path_factory.mktemp("cached")))


class Served:
    """A scheduler on a 3-row engine of the tiny model, driven in-process."""

    def __init__(self, model, home, cache_bytes: int):
        engine = Engine(model, 3, STREAM, CHUNK, BLOCK)
        self.scheduler = Scheduler(
            engine, home / "sessions", prefill_tokens=8, prompt_cache=PromptCache(cache_bytes)
        ).start()

    def ask(self, sampling: RowSampling = GREEDY, **request) -> dict:
        """(the reply's tokens, its text, the done event) of one request run to its end."""
        events: queue.Queue = queue.Queue()
        self.scheduler.submit(Job(sampling=sampling, emit=events.put, **request))
        tokens, text = [], ""
        while (event := events.get(timeout=60)).kind not in ("done", "error"):
            tokens += event.tokens
            text += event.text
        assert event.kind == "done", event.error
        return {"tokens": tokens, "text": text, "cached": event.cached_tokens}

    def close(self):
        self.scheduler.stop()


@pytest.fixture
def servers(tiny, tmp_path):
    """(a server with the prompt cache, one without)."""
    pair = Served(tiny, tmp_path / "a", 1 << 30), Served(tiny, tmp_path / "b", 0)
    yield pair
    for s in pair:
        s.close()


PROMPT = np.random.default_rng(4).integers(5, 97, size=23).tolist()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seed"])
def test_hits_from_prompt_and_reply_ends_give_the_uncached_tokens(servers, sampling):
    cached, plain = servers
    first = cached.ask(sampling, prompt=PROMPT)
    assert first["cached"] == 0 and first["tokens"] == plain.ask(sampling, prompt=PROMPT)["tokens"]
    # the same prompt again: the state at its end, nothing left to feed
    again = cached.ask(sampling, prompt=PROMPT)
    assert again == first | {"cached": len(PROMPT)}
    # the conversation goes on: prompt + reply + more, from the state at the reply's end
    reply = [t for t in first["tokens"] if t != 2]  # an EOS never enters the stream
    longer = PROMPT + reply + [11, 12, 13]
    want = plain.ask(sampling, prompt=longer)
    got = cached.ask(sampling, prompt=longer)
    assert got["cached"] == len(PROMPT) + len(reply)
    assert got["tokens"] == want["tokens"] and got["cached"] > 0 and want["cached"] == 0
    # a prompt that leaves the cached stream early finds only the shorter prefix
    fork = [*PROMPT[:10], 40, 41]
    assert cached.ask(sampling, prompt=fork)["cached"] == 0
    assert cached.ask(sampling, prompt=fork)["cached"] == len(fork)


def test_conversations_sharing_a_system_prompt_share_only_it(servers):
    """A second conversation with the same system prompt starts from the state at the end of
    the system message, never from the first conversation's own turns."""
    cached, plain = servers
    system = {"role": "system", "content": " ".join(f"t{i}" for i in range(30, 52))}
    a = [system, {"role": "user", "content": "t60 t61 t62"}]
    b = [system, {"role": "user", "content": "t70 t71"}]
    first = cached.ask(messages=a)
    assert first["cached"] == 0
    system_ids = 1 + 22 + 1  # t3, the 22 words, t4
    other = cached.ask(messages=b)
    assert other["cached"] == system_ids
    assert other["tokens"] == plain.ask(messages=b)["tokens"]
    # the first conversation resent with its reply and a new message: from its reply's end
    resent = [
        *a,
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "t80"},
    ]
    got = cached.ask(messages=resent)
    assert got["cached"] > system_ids + 3
    assert got["tokens"] == plain.ask(messages=resent)["tokens"]


@pytest.mark.parametrize("stream", [STREAM, StreamConfig(2, 30)], ids=["wrapped", "not-full"])
def test_a_restored_prefix_gives_the_uncached_logits(tiny, stream):
    """Feeding a prompt's rest into a state restored from its prefix (kept at another chunk
    boundary, through the cache, which keeps only the slots the prefix fills) gives the
    next-token logits of the whole prompt fed at once, within 1e-5, and the same tokens."""
    engine = Engine(tiny, 2, stream, CHUNK, BLOCK)
    row = engine.open()
    engine.feed(row, PROMPT[:9])
    cache = PromptCache(1 << 30)
    filled = engine.export(row, filled_only=True)  # the first 16 slots (9 rounded up)
    cache.store(PROMPT[:9], filled)
    full = state_bytes(engine.export(row))
    assert (state_bytes(filled) < full) == (stream.capacity > 16)
    assert cache.bytes == full if stream.capacity <= 9 else cache.bytes < full
    engine.release(row)
    restored = engine.restore(cache.lookup(PROMPT).state, GREEDY)
    engine.feed(restored, PROMPT[9:])
    fresh = engine.open(GREEDY)
    engine.feed(fresh, PROMPT)
    got, want = (engine.export(r).logits for r in (restored, fresh))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for r in (restored, fresh):
        engine.arm(r, GREEDY)
    tokens = {restored: [], fresh: []}
    while engine.live.any():
        for r, new in enumerate(engine.decode()):
            if r in tokens:
                tokens[r] += new
    assert tokens[restored] == tokens[fresh] and len(tokens[fresh]) == GREEDY.max_tokens


def fake_state(n_bytes: int) -> RowState:
    from jaxsink.traced import cache as kv

    one = kv.KVCache(
        layers=(), pos=np.zeros(1, np.int32), epoch=np.zeros(1, np.int32), stream=STREAM
    )
    return RowState(one, 0, np.zeros(n_bytes // 4 - 2, np.float32), np.zeros(2, np.uint32))


def test_the_byte_bound_evicts_the_least_recently_used():
    states = {k: fake_state(1000) for k in ("a", "b", "c")}
    assert state_bytes(states["a"]) == 1000
    cache = PromptCache(2500)
    cache.store([1, 2], states["a"])
    cache.store([1, 2, 3, 4], states["b"])
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == 4  # the longest prefix
    assert cache.lookup([1, 2, 9]).tokens == 2  # [1, 2] is now the most recently used
    assert cache.lookup([2, 1]) is None and cache.lookup([1]) is None
    cache.store([7], states["c"])  # over the bound: [1, 2, 3, 4] goes
    assert cache.bytes == 2000 <= cache.max_bytes and len(cache) == 2
    assert [1, 2, 3, 4] not in cache and [1, 2] in cache and [7] in cache
    cache.store([8], fake_state(4000))  # larger than the bound: never kept
    assert [8] not in cache and cache.bytes == 2000
    assert cache.stats()["prompt_cache_evictions"] == 1
    off = PromptCache(0)
    off.store([1], states["a"])
    assert len(off) == 0 and off.lookup([1]) is None
