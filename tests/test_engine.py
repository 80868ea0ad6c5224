"""The batch engine: every row equals the same stream run alone, token for token (greedy and
sampled with the same seed), rows inserted while others are mid-stream and rows reused after a
release included, with one compile each for prefill and decode; per-row sampling cuts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxsink.config import ConfigError, StreamConfig
from jaxsink.engine import (
    Engine,
    RowSampling,
    bucket_of,
    buckets,
    padded_chunks,
    token_buckets,
)
from jaxsink.traced import entry
from jaxsink.traced.sampling import sample_rows
from tests.support.tiny import random_flat_params, tiny_config, tiny_model

STREAM = StreamConfig(2, 5)
REQUESTS = [  # (prompt length, settings): greedy, top-k, nucleus, plain temperature
    (9, RowSampling(max_tokens=14)),
    (3, RowSampling(temperature=0.9, top_k=5, seed=1, max_tokens=11)),
    (17, RowSampling(temperature=0.7, top_p=0.8, seed=2, max_tokens=9)),
    (6, RowSampling(temperature=1.3, seed=3, max_tokens=12)),
]


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return tiny_model(cfg, random_flat_params(cfg, seed=21))


def prompts():
    rng = np.random.default_rng(22)
    return [rng.integers(0, 97, size=n).tolist() for n, _ in REQUESTS]


def run_alone(model, prompt, sampling) -> list[int]:
    engine = Engine(model, 1, STREAM, chunk=4, block=5)
    engine.insert(prompt, sampling)
    tokens = []
    while engine.live.any():
        tokens += engine.decode()[0]
    return tokens


def test_rows_equal_streams_run_alone(tiny):
    """Three rows, streams inserted one by one while the others decode, a fourth stream in the
    row the first one released: each row's tokens equal its stream run alone."""
    alone = [run_alone(tiny, p, s) for p, (_, s) in zip(prompts(), REQUESTS, strict=True)]
    assert all(len(t) == s.max_tokens for t, (_, s) in zip(alone, REQUESTS, strict=True))
    before = dict(entry.TRACES)
    engine = Engine(tiny, 3, STREAM, chunk=4, block=5)
    got = {}
    pending = list(zip(prompts(), REQUESTS, strict=True))
    owner = {}
    step = 0
    while pending or engine.live.any():
        if pending and engine.free_rows() and step % 2 == 0:  # insert mid-stream
            prompt, (_, sampling) = pending.pop(0)
            request = len(REQUESTS) - len(pending) - 1
            owner[engine.insert(prompt, sampling)] = request
            got[request] = []
        for row, new in enumerate(engine.decode()):
            if row in owner:
                got[owner[row]] += new
                if not engine.live[row]:
                    engine.release(row)
                    del owner[row]
        step += 1
    assert [got[i] for i in range(len(REQUESTS))] == alone
    traced = {k: v - before.get(k, 0) for k, v in entry.TRACES.items() if v != before.get(k, 0)}
    # for the whole run: decode in the 1-row bucket and all 3 rows (a 2-row bucket of 3 would
    # copy more than it saves, `Engine._bucket`), compiled at the start; prefill one row at a
    # time in chunks of 4 and last pieces of at most 2
    assert traced == {"prefill_rows": 2, "decode_rows": 2}


def test_a_full_engine_and_bad_prompts_are_clear_errors(tiny):
    engine = Engine(tiny, 1, STREAM, chunk=4, block=5)
    engine.insert([1, 2, 3])
    with pytest.raises(ConfigError, match="all 1 rows are busy"):
        engine.insert([4])
    engine.release(0)
    with pytest.raises(ConfigError, match="empty prompt"):
        engine.insert([])
    with pytest.raises(ConfigError, match="token id 97 is out of range"):
        engine.insert([97])


def test_per_row_cuts_keep_only_their_tokens():
    """top-k keeps each row's k best, top-p its nucleus, per row, in one call."""
    import jax
    import jax.numpy as jnp

    logits = jnp.asarray(np.random.default_rng(3).standard_normal((50, 3)), jnp.float32)
    temperature = jnp.asarray([1.0, 1.0, 0.0])
    top_k, top_p = jnp.asarray([3, 0, 0]), jnp.asarray([1.0, 0.3, 1.0])
    seen = [set(), set(), set()]
    for i in range(200):
        keys = jax.random.split(jax.random.key(i), 3)
        draws = jax.jit(sample_rows)(logits, keys, temperature, top_k, top_p)
        for row, t in enumerate(np.asarray(draws)):
            seen[row].add(int(t))
    order = np.argsort(-np.asarray(logits), axis=0)
    assert seen[0] <= set(order[:3, 0]) and len(seen[0]) == 3
    probs = np.asarray(jax.nn.softmax(logits[:, 1]))
    nucleus = order[: np.searchsorted(np.cumsum(probs[order[:, 1]]), 0.3) + 1, 1]
    assert seen[1] <= set(nucleus)
    assert seen[2] == {int(order[0, 2])}  # greedy


def test_padded_chunks_cover_the_stream_once():
    ids = np.arange(10)
    chunks = list(padded_chunks(ids, 4))
    assert [n for *_, n in chunks] == [4, 4, 2]
    tokens = np.concatenate([t[v] for t, v, _ in chunks])
    assert tokens.tolist() == ids.tolist()
    assert all(t.shape == (1, 4) for t, _, _ in chunks)


def test_a_prompt_fed_between_other_rows_blocks_equals_it_alone(tiny):
    """A sampled stream whose prompt is fed a chunk at a time while another row decodes (as the
    server interleaves them) equals the same stream run alone: a row's key moves only while it
    is live."""
    prompt, (_, sampling) = prompts()[2], REQUESTS[2]
    want = run_alone(tiny, prompt, sampling)
    engine = Engine(tiny, 2, STREAM, chunk=4, block=5)
    engine.insert(prompts()[3], RowSampling(temperature=1.0, seed=9, max_tokens=40))
    row = engine.open(sampling)
    for _ in engine.feeding(row, prompt):
        engine.decode(limit=1)  # the other row moves on between chunks
    engine.arm(row, sampling)
    got = []
    while engine.live[row]:
        got += engine.decode()[row]
    assert got == want


def test_each_bucket_compiles_once_and_rows_move_between_buckets(tiny):
    """An 8-row engine compiles decode once per row bucket (1, 2, 4, 8: ceil(log2 8) + 1), and
    prefill and the mixed step once per row bucket and token bucket (half a chunk and a chunk),
    and never again,
    while five streams start together and end at different times, so the live rows run in
    buckets 8, 4, 2 and 1 in turn: each equals its stream run alone."""
    assert buckets(8) == (1, 2, 4, 8) and buckets(12) == (1, 2, 4, 8, 12) and buckets(1) == (1,)
    settings = [dataclasses.replace(s, max_tokens=3 + 5 * i) for i, (_, s) in enumerate(REQUESTS)]
    settings.append(RowSampling(temperature=0.5, seed=5, max_tokens=23))
    rng = np.random.default_rng(23)
    streams = [(rng.integers(0, 97, size=4 + i).tolist(), s) for i, s in enumerate(settings)]
    alone = [run_alone(tiny, p, s) for p, s in streams]
    before = dict(entry.TRACES)
    engine = Engine(tiny, 8, STREAM, chunk=4, block=5)
    engine.warm()
    traced = {k: v - before.get(k, 0) for k, v in entry.TRACES.items() if v != before.get(k, 0)}
    assert token_buckets(4) == (2, 4) and token_buckets(64) == (32, 64)
    assert traced == {"prefill_rows": 4 * 2, "mixed_rows": 4 * 2, "decode_rows": 4}
    rows = [engine.insert(p, s) for p, s in streams]
    got = {row: [] for row in rows}
    sizes = set()
    while engine.live.any():
        sizes.add(bucket_of(int(engine.live.sum()), 8))
        for row, new in enumerate(engine.decode()):
            if row in got:
                got[row] += new
    assert [got[r] for r in rows] == alone
    assert sizes == {1, 2, 4, 8}
    assert all(entry.TRACES[k] == before.get(k, 0) + n for k, n in traced.items())  # no more


def test_prompts_fed_together_equal_each_fed_alone(tiny):
    """Prefill steps that feed a chunk of several prompts at once (of different lengths, one
    row's stream already going on), with a decode step of the live rows between them, as the
    server mixes them: each stream equals the same stream run alone."""
    streams = [(p, s) for p, (_, s) in zip(prompts(), REQUESTS, strict=True)]
    alone = [run_alone(tiny, p, s) for p, s in streams]
    engine = Engine(tiny, 4, STREAM, chunk=4, block=5)
    first = engine.insert(*streams[0])
    got = {first: engine.decode(limit=2)[first]}
    rows = [engine.open(s) for _, s in streams[1:]]
    fed = dict.fromkeys(rows, 0)
    while any(fed[r] < len(p) for r, (p, _) in zip(rows, streams[1:], strict=True)):
        feeds = {r: p[fed[r] : fed[r] + 4] for r, (p, _) in zip(rows, streams[1:], strict=True)}
        feeds = {r: ids for r, ids in feeds.items() if ids}
        engine.prefill(feeds)
        for r, ids in feeds.items():
            fed[r] += len(ids)
            if fed[r] == len(streams[1 + rows.index(r)][0]):
                engine.arm(r, streams[1 + rows.index(r)][1])
                got[r] = []
        for r, new in enumerate(engine.decode(limit=1)):
            if r in got:
                got[r] += new
    while engine.live.any():
        for r, new in enumerate(engine.decode()):
            if r in got:
                got[r] += new
    assert [got[r] for r in [first, *rows]] == alone


def test_mixed_steps_equal_prefill_then_decode(tiny):
    """Mixed steps (`Engine.step`: every live row's decode step and a chunk of several prompts
    in one pass) equal the same streams run alone, and compile once per prefill shape: the
    prompts are fed while other rows decode, and rows start decoding as their prompts end."""
    streams = [(p, s) for p, (_, s) in zip(prompts(), REQUESTS, strict=True)]
    alone = [run_alone(tiny, p, s) for p, s in streams]
    engine = Engine(tiny, 4, STREAM, chunk=4, block=5)
    before = dict(entry.TRACES)
    first = engine.insert(*streams[0])
    got = {first: engine.decode(limit=2)[first]}
    rows = [engine.open(s) for _, s in streams[1:]]
    fed = dict.fromkeys(rows, 0)
    mixed = 0
    while any(fed[r] < len(p) for r, (p, _) in zip(rows, streams[1:], strict=True)):
        feeds = {r: p[fed[r] : fed[r] + 4] for r, (p, _) in zip(rows, streams[1:], strict=True)}
        feeds = {r: ids for r, ids in feeds.items() if ids}
        mixed += bool(engine.live.any())
        for r, new in enumerate(engine.step(feeds)):
            if r in got:
                got[r] += new
        for r, ids in feeds.items():
            fed[r] += len(ids)
            if fed[r] == len(streams[1 + rows.index(r)][0]):
                engine.arm(r, streams[1 + rows.index(r)][1])
                got[r] = []
    while engine.live.any():
        for r, new in enumerate(engine.decode()):
            if r in got:
                got[r] += new
    assert mixed >= 3
    assert [got[r] for r in [first, *rows]] == alone
    traced = {k: v - before.get(k, 0) for k, v in entry.TRACES.items() if v != before.get(k, 0)}
    assert traced["mixed_rows"] <= len(buckets(4)) * len(token_buckets(4))
    engine.append(first, [5], RowSampling(max_tokens=3))
    with pytest.raises(ConfigError, match="must not be decoding"):
        engine.step({first: [1]})
