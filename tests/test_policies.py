"""Eviction by attention (`--policy tova|h2o`, `jaxsink.traced.policy`) against the NumPy
reference of the contract, token by token, over streams that evict many times."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsink import cli
from jaxsink.config import Alibi, ConfigError, StreamConfig
from jaxsink.traced import cache as kv
from jaxsink.traced import entry
from tests.support.spec_reference import stream_logits
from tests.support.tiny import feed, random_flat_params, tiny_checkpoint, tiny_config, tiny_model

POLICIES = [("tova", 0), ("h2o", 3)]


def _mixed_layers(cfg, **per_layer):
    """cfg with its second layer's attention changed as `per_layer` says."""
    second = dataclasses.replace(
        cfg.layers[1], attention=dataclasses.replace(cfg.layers[1].attention, **per_layer)
    )
    return dataclasses.replace(cfg, layers=(cfg.layers[0], second, *cfg.layers[2:]))


CONFIGS = {
    "gqa-rotary": tiny_config(),
    "mqa-alibi": tiny_config(num_kv_heads=1, position=Alibi((0.5, 0.25, 0.125, 0.0625))),
    "learned-sinks-softcap": tiny_config(learned_sinks=True, softcap=5.0),
    "native-sliding-layer": _mixed_layers(tiny_config(num_layers=3), sliding_window=4),
    "a-layer-without-positions": _mixed_layers(tiny_config(), position=None),
}


def _nll(logits, tokens):
    """Per-token NLL of tokens[1:] under logits[:-1] (float64)."""
    logits = np.asarray(logits, np.float64)[:-1]
    top = logits.max(axis=-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logz - logits[np.arange(len(logits)), tokens[1:]]


def _against_reference(name, policy, recent, window, n_tokens, chunk, seed):
    """The reference's logits [n_tokens, V] for a stream of `n_tokens` random tokens through 2
    sinks + `window` under `policy`, after checking jaxsink's per-token NLL (fed `chunk`
    tokens at a time) within 1e-5 of them; the stream's flat params and tokens with them."""
    cfg = CONFIGS[name]
    flat = random_flat_params(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, n_tokens)).astype(np.int32)
    stream = StreamConfig(2, window, "sink", policy, recent)
    want = stream_logits(flat, cfg, tokens[0], 2, window, policy=policy, recent=recent)
    got, _ = feed(tiny_model(cfg, flat), stream, tokens, chunk=chunk)
    np.testing.assert_allclose(_nll(got[0], tokens[0]), _nll(want, tokens[0]), atol=1e-5, rtol=0)
    return want, flat, tokens[0]


@pytest.mark.parametrize("policy, recent", POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_policies_match_the_reference_token_by_token(name, policy, recent):
    """K = 8 slots over 48 tokens: 40 evictions per layer, each layer its own."""
    want, flat, tokens = _against_reference(name, policy, recent, 6, 48, chunk=5, seed=11)
    sink = stream_logits(flat, CONFIGS[name], tokens, 2, 6)
    assert np.abs(want - sink).max() > 1e-2  # the policy kept other tokens than the ring


@pytest.mark.parametrize("policy, recent", [("tova", 0), ("h2o", 9)], ids=["tova", "h2o"])
@pytest.mark.parametrize("name", ["gqa-rotary", "mqa-alibi", "learned-sinks-softcap"])
def test_chunks_that_fill_the_cache_match_the_reference(name, policy, recent):
    """K = 32 slots fed 6 tokens at a time: five chunks enter a cache that is not yet full
    (computed at once, `attention._entering`), h2o's received attention adding up over them, then one
    chunk fills it across and 48 tokens evict."""
    _against_reference(name, policy, recent, 30, 80, chunk=6, seed=21)


@pytest.mark.parametrize("policy, recent", POLICIES, ids=[p for p, _ in POLICIES])
def test_any_chunk_gives_the_tokens_fed_one_by_one(policy, recent):
    """The contract: a chunk's tokens enter the cache one by one, each seeing what its
    predecessors left, so every chunk size gives the same stream, batch rows apart."""
    cfg = tiny_config(num_heads=6, num_kv_heads=2)
    m = tiny_model(cfg, random_flat_params(cfg, seed=5))
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 120)).astype(np.int32)
    stream = StreamConfig(2, 9, "sink", policy, recent)
    one, _ = feed(m, stream, tokens, chunk=1)
    for chunk in (7, 64):
        many, _ = feed(m, stream, tokens, chunk=chunk)
        np.testing.assert_allclose(many, one, atol=1e-5, rtol=1e-5)
    alone, _ = feed(m, stream, tokens[1:], chunk=7)
    np.testing.assert_allclose(alone[0], one[1], atol=1e-5, rtol=1e-5)


def test_one_compile_and_constant_bytes_over_a_long_stream():
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg))
    sink, tova = StreamConfig(4, 28), StreamConfig(4, 28, "sink", "tova")
    h2o = StreamConfig(4, 28, "sink", "h2o", 14)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 1500)).astype(np.int32)
    cache = kv.init_cache(cfg, tova, 1)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    entry.TRACES.clear()
    _, cache = feed(m, tova, tokens, chunk=16, cache=cache)
    assert entry.TRACES["step"] == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == shapes
    # The per-slot ranks (and h2o's scores) are counted: 4-8 bytes a slot beside a slot's
    # keys and values (2 x 2 kv heads x head_dim 32 x 4 bytes here, SmolLM2's 1,536).
    wide = tiny_config(head_dim=32)
    sink_bytes = kv.cache_bytes(wide, sink, 1)
    for stream in (tova, h2o):
        assert sink_bytes < kv.cache_bytes(wide, stream, 1) <= 1.02 * sink_bytes


def test_bfloat16_runs():
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg), jnp.bfloat16)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 40)).astype(np.int32)
    logits, _ = feed(m, StreamConfig(2, 6, "sink", "tova"), tokens, chunk=8)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: StreamConfig.for_mode("window", 4, 60, policy="tova"), "use it with --mode sink"),
        (lambda: StreamConfig.for_mode("dense", 0, 60, 60, policy="h2o"), "not dense"),
        (lambda: StreamConfig(4, 60, "sink", "h2o", 60), "[1, window - 1] = [1, 59], got 60"),
        (lambda: StreamConfig(4, 60, "sink", "tova", 5), "tova has none"),
        (lambda: StreamConfig(4, 60, "sink", "lru"), "unknown policy 'lru'"),
        (
            lambda: kv.init_cache(tiny_config(), StreamConfig(4, 60, "sink", "tova"), 1, jnp.int8),
            "float cache",
        ),
    ],
)
def test_what_a_policy_cannot_do_is_refused(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def test_ppl_and_generate_commands(tiny_dir, tmp_path, capsys):
    """`jaxsink ppl --policy P` writes its per-token NLL and `modes.sink.policy`; --chunk 1 and
    the default chunk agree (a chunk's tokens enter one by one); `generate --policy` reports
    its policy; a policy outside sink mode exits 2 with one line."""
    ids = np.random.default_rng(4).integers(0, 90, 200)
    np.save(tmp_path / "ids.npy", ids)
    base = ["ppl", "--model", str(tiny_dir), "--tokens", str(tmp_path / "ids.npy"), "--quiet"]
    small = ["--sinks", "2", "--window", "14"]
    nll = {}
    for policy, chunk in (("sink", "128"), ("tova", "128"), ("tova", "1"), ("h2o", "128")):
        out = tmp_path / f"{policy}-{chunk}"
        argv = [*base, *small, "--policy", policy, "--chunk", chunk, "--out", str(out)]
        assert cli.main(argv) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())["modes"]["sink"]
        assert summary["policy"] == policy and summary["cache_bytes"] > 0
        nll[policy, chunk] = np.load(out / "nll_sink.npy")
    np.testing.assert_allclose(nll["tova", "1"], nll["tova", "128"], atol=1e-5, rtol=0)
    assert np.abs(nll["tova", "128"] - nll["sink", "128"]).max() > 1e-3
    assert np.abs(nll["h2o", "128"] - nll["tova", "128"]).max() > 1e-3

    capsys.readouterr()
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "t3 t4 t5", "--policy", "h2o"]
    assert cli.main([*argv, *small, "--max-new-tokens", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["policy"] == "h2o"

    for argv in (
        [*base, "--mode", "window", "--policy", "tova"],
        [*base, "--policy", "h2o", "--recent", "0"],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("--mode sink" in err or "--recent" in err), (
            err
        )


@pytest.mark.parametrize("policy, recent", POLICIES, ids=[p for p, _ in POLICIES])
def test_engine_rows_equal_streams_run_alone(policy, recent):
    """Batched rows under a policy (rows gathered into buckets, prompts fed in mixed steps
    beside decoding rows, a row reused after another stream) equal each stream run alone."""
    from jaxsink.engine import Engine, RowSampling

    cfg = tiny_config()
    model = tiny_model(cfg, random_flat_params(cfg, seed=21))
    stream = StreamConfig(2, 5, "sink", policy, recent)
    rng = np.random.default_rng(22)
    requests = [
        (rng.integers(0, 97, size=n).tolist(), RowSampling(temperature=t, seed=i, max_tokens=m))
        for i, (n, t, m) in enumerate([(9, 0.0, 14), (3, 0.9, 11), (17, 0.7, 9), (6, 0.0, 12)])
    ]

    def alone(prompt, sampling):
        engine = Engine(model, 1, stream, chunk=4, block=5)
        engine.insert(prompt, sampling)
        tokens = []
        while engine.live.any():
            tokens += engine.decode()[0]
        return tokens

    want = [alone(p, s) for p, s in requests]
    engine = Engine(model, 4, stream, chunk=4, block=5)
    first = engine.insert(*requests[0])
    got = {first: engine.decode(limit=2)[first]}
    rows = [engine.open(s) for _, s in requests[1:]]
    fed = dict.fromkeys(rows, 0)
    while any(fed[r] < len(p) for r, (p, _) in zip(rows, requests[1:], strict=True)):
        feeds = {r: p[fed[r] : fed[r] + 4] for r, (p, _) in zip(rows, requests[1:], strict=True)}
        feeds = {r: ids for r, ids in feeds.items() if ids}
        for r, new in enumerate(engine.step(feeds)):
            if r in got:
                got[r] += new
        for r, ids in feeds.items():
            fed[r] += len(ids)
            if fed[r] == len(requests[1 + rows.index(r)][0]):
                engine.arm(r, requests[1 + rows.index(r)][1])
                got[r] = []
    while engine.live.any():
        for r, new in enumerate(engine.decode()):
            if r in got:
                got[r] += new
    assert [got[r] for r in [first, *rows]] == want
    engine.release(first)  # a row reused: its old stream's slots and ranks are not seen
    again = engine.insert(*requests[3])
    tokens = []
    while engine.live[again]:
        tokens += engine.decode()[again]
    assert tokens == want[3]
