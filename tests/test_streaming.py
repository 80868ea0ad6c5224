"""The streaming contract (docs/streaming-contract.md) on tiny random models: windows, positions, chunks, compiles."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsink.config import StreamConfig
from jaxsink.traced import attention, entry
from jaxsink.traced import cache as kv
from tests.support.spec_reference import spec_view, stream_logits
from tests.support.tiny import feed, random_flat_params, tiny_config, tiny_model


@pytest.mark.parametrize(
    "stream",
    [StreamConfig(2, 5, "sink"), StreamConfig(0, 6, "window"), StreamConfig(3, 4, "sink")],
    ids=str,
)
def test_matches_spec_reference_over_many_evictions(stream):
    cfg = tiny_config()
    flat = random_flat_params(cfg, seed=1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(1, 48)).astype(np.int32)
    want = stream_logits(flat, cfg, tokens[0], stream.sinks, stream.window)
    got, _ = feed(tiny_model(cfg, flat), stream, tokens, chunk=1)
    np.testing.assert_allclose(got[0], want, atol=2e-4, rtol=0)


def test_dense_matches_spec_reference():
    cfg = tiny_config()
    flat = random_flat_params(cfg, seed=3)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(1, 30)).astype(np.int32)
    want = stream_logits(flat, cfg, tokens[0], 0, 30, dense=True)
    got, _ = feed(tiny_model(cfg, flat), StreamConfig(0, 30, "dense"), tokens, chunk=8)
    np.testing.assert_allclose(got[0], want, atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "stream", [StreamConfig(2, 5), StreamConfig(4, 60), StreamConfig(0, 9, "window")], ids=str
)
def test_chunks_equal_token_by_token(stream):
    cfg = tiny_config(num_heads=6, num_kv_heads=2)
    m = tiny_model(cfg, random_flat_params(cfg, seed=5))
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 300)).astype(np.int32)
    one, _ = feed(m, stream, tokens, chunk=1)
    for chunk in (7, 64):
        many, _ = feed(m, stream, tokens, chunk=chunk)
        np.testing.assert_allclose(many, one, atol=1e-4, rtol=1e-4)


def test_one_compile_and_constant_cache_over_a_long_stream():
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg))
    stream = StreamConfig(4, 28)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 3000)).astype(np.int32)
    cache = kv.init_cache(cfg, stream, 1)
    shapes_before = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    bytes_before = cache.nbytes
    entry.TRACES.clear()
    _, cache = feed(m, stream, tokens, chunk=16, cache=cache)
    assert entry.TRACES["step"] == 1
    assert int(cache.pos[0]) == 3000
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == shapes_before
    assert cache.nbytes == bytes_before == kv.cache_bytes(cfg, stream, 1)


def test_position_precision_far_into_the_stream():
    """Same cache contents at t ~ 4,000 and t ~ 4,000,000 (a multiple of W apart): same logits."""
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg, seed=7))
    stream = StreamConfig(4, 60)
    tokens = (
        np.random.default_rng(8).integers(0, cfg.vocab_size, size=(1, 4000 + 64)).astype(np.int32)
    )
    _, near = feed(m, stream, tokens[:, :4000], chunk=64)
    shift = (4_000_000 // stream.window) * stream.window
    far = jax.tree.map(jnp.copy, near).replace(pos=near.pos + shift)  # near is donated below
    near_logits, _ = feed(m, stream, tokens[:, 4000:], chunk=16, cache=near)
    far_logits, _ = feed(m, stream, tokens[:, 4000:], chunk=16, cache=far)
    np.testing.assert_array_equal(near_logits, far_logits)


@pytest.mark.parametrize("power", [31, 40])
def test_streams_past_int32_positions(power):
    """A cache set to start 10 tokens before 2^31 (and 2^40), fed 20 tokens, gives logits bit-equal
    to the same tokens at a small position a multiple of W away; the stream index stays exact
    (an epoch count plus a small position) and the row folds a quantum on the way."""
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg, seed=7))
    stream = StreamConfig(4, 60)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(1, 400 + 20))
    tokens = tokens.astype(np.int32)
    _, near = feed(m, stream, tokens[:, :400], chunk=40)
    start = 2**power - 10
    start -= (start - 400) % stream.window  # the ring's layout repeats every W tokens
    far = kv.at_stream_index(jax.tree.map(jnp.copy, near), start)
    assert kv.stream_index(far) == [start]
    near_logits, near = feed(m, stream, tokens[:, 400:], chunk=4, cache=near)
    far_logits, far = feed(m, stream, tokens[:, 400:], chunk=4, cache=far)
    np.testing.assert_array_equal(near_logits, far_logits)
    assert kv.stream_index(far) == [start + 20] and kv.stream_index(near) == [420]
    assert int(far.pos[0]) < 2**30 and int(far.epoch[0]) >= 1


def test_folding_keeps_a_stream_exact_across_a_quantum():
    """A row crossing a folding point gives one quantum to its epoch mid-stream: its logits
    equal a copy that never folds (the same contents, a small position)."""
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg, seed=7))
    stream = StreamConfig(2, 5)
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, size=(1, 60)).astype(np.int32)
    _, cache = feed(m, stream, tokens[:, :30], chunk=6)
    quantum = kv.fold_quantum(cache)
    assert quantum % stream.window == 0 and quantum >= 2**29
    edge = quantum + 2 * stream.capacity - 3  # three tokens before the row folds
    edge -= (edge - 30) % stream.window
    folding = kv.at_stream_index(jax.tree.map(jnp.copy, cache), edge)
    small, _ = feed(m, stream, tokens[:, 30:], chunk=6, cache=cache)
    big, folding = feed(m, stream, tokens[:, 30:], chunk=6, cache=folding)
    np.testing.assert_array_equal(small, big)
    assert int(folding.epoch[0]) == 1 and kv.stream_index(folding) == [edge + 30]


def test_rows_are_independent_streams():
    """Rows at different stream positions in one batch equal the same streams run alone."""
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg, seed=9))
    stream = StreamConfig(2, 6)
    rng = np.random.default_rng(10)
    a = rng.integers(0, cfg.vocab_size, size=(1, 40)).astype(np.int32)
    b = rng.integers(0, cfg.vocab_size, size=(1, 23)).astype(np.int32)
    alone_a, _ = feed(m, stream, a, chunk=5)
    alone_b, _ = feed(m, stream, b, chunk=5)
    # Feed both rows together; row b's chunks are padded past its end.
    tokens = np.zeros((2, 40), np.int32)
    tokens[0], tokens[1, :23] = a[0], b[0]
    valid = np.zeros((2, 40), bool)
    valid[0], valid[1, :23] = True, True
    cache = kv.init_cache(cfg, stream, 2)
    outs = []
    for i in range(0, 40, 5):
        lg, cache = entry.step(
            m.weights, cache, tokens[:, i : i + 5], valid[:, i : i + 5], graphdef=m.graphdef
        )
        outs.append(np.asarray(lg))
    both = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(both[0], alone_a[0], atol=2e-5)
    np.testing.assert_allclose(both[1, :23], alone_b[0], atol=2e-5)
    assert list(np.asarray(cache.pos)) == [40, 23]


@pytest.mark.parametrize(
    "stream",
    [StreamConfig(2, 5), StreamConfig(0, 9, "window"), StreamConfig(0, 40, "dense")],
    ids=str,
)
def test_wide_batches_use_the_fused_form_and_match_rows_alone(stream, monkeypatch):
    """From `_FUSED_MIN_PAIRS` batch rows x kv heads up, attention runs in its fused form (peak
    recovered after the kernel); rows of such a batch, padded to different lengths, equal each
    stream run alone in the plain form."""
    monkeypatch.setattr(kv, "RING_BLOCK", 16)  # dense: blocks skipped while empty
    cfg = tiny_config(num_heads=6, num_kv_heads=2)
    lengths = [40, 23, 40, 1, 31, 40]
    assert (
        cfg.layers[0].attention.num_kv_heads
        < attention.FUSED_MIN_PAIRS
        <= len(lengths) * cfg.layers[0].attention.num_kv_heads
    )
    m = tiny_model(cfg, random_flat_params(cfg, seed=15))
    tokens = np.random.default_rng(16).integers(0, cfg.vocab_size, size=(6, 40)).astype(np.int32)
    valid = np.arange(40)[None, :] < np.array(lengths)[:, None]
    alone = [feed(m, stream, tokens[i : i + 1, :n], chunk=1)[0][0] for i, n in enumerate(lengths)]
    for chunk in (1, 8):
        cache, outs = kv.init_cache(cfg, stream, 6), []
        for i in range(0, 40, chunk):
            part = slice(i, i + chunk)
            lg, cache = entry.step(
                m.weights, cache, tokens[:, part], valid[:, part], graphdef=m.graphdef
            )
            outs.append(np.asarray(lg))
        both = np.concatenate(outs, axis=1)
        assert np.isfinite(both).all()
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(both[row, :n], alone[row], atol=1e-4, rtol=0)
        assert list(np.asarray(cache.pos)) == lengths


def test_cache_slots_by_hand():
    """Which stream index sits in each slot, after each step of a small stream (S=2, W=3)."""
    stream = StreamConfig(2, 3)
    expected = {
        0: [-1, -1, -1, -1, -1],
        1: [0, -1, -1, -1, -1],
        3: [0, 1, 2, -1, -1],
        5: [0, 1, 2, 3, 4],
        6: [0, 1, 5, 3, 4],
        8: [0, 1, 5, 6, 7],
        9: [0, 1, 8, 6, 7],
    }
    for pos, slots in expected.items():
        got = kv.slot_tokens(stream, np.array([pos], np.int32))
        assert list(np.asarray(got[0])) == slots, pos


def test_spec_view_by_hand():
    # S=2, W=3, K=5: at t=9 the query sees sinks 0,1 (at distances 5-0, 5-1) and 6, 7, 8, 9.
    assert spec_view(9, 2, 3) == [(0, 5), (1, 4), (6, 3), (7, 2), (8, 1), (9, 0)]
    assert spec_view(4, 2, 3) == [(0, 4), (1, 3), (2, 2), (3, 1), (4, 0)]


@pytest.mark.parametrize("stream", [StreamConfig(3, 20), StreamConfig(0, 40, "dense")], ids=str)
def test_cache_in_blocks_matches_spec_reference(stream, monkeypatch):
    """A cache of many blocks (small blocks here), some skipped while still empty, computes
    exactly the the streaming contract."""
    monkeypatch.setattr(kv, "RING_BLOCK", 6)
    assert len(kv.slot_blocks(stream)) >= 4
    cfg = tiny_config()
    flat = random_flat_params(cfg, seed=13)
    tokens = np.random.default_rng(14).integers(0, cfg.vocab_size, size=(1, 40)).astype(np.int32)
    dense = stream.mode == "dense"
    want = stream_logits(flat, cfg, tokens[0], stream.sinks, stream.window, dense=dense)
    for chunk in (1, 7):
        got, _ = feed(tiny_model(cfg, flat), stream, tokens, chunk=chunk)
        np.testing.assert_allclose(got[0], want, atol=2e-4, rtol=0)


def test_slot_blocks():
    assert kv.slot_blocks(StreamConfig(4, 1020)) == ((0, 4), (4, 1020))
    assert kv.slot_blocks(StreamConfig(0, 2500, "dense")) == ((0, 834), (834, 833), (1667, 833))


@pytest.mark.parametrize("batch", [2, 8], ids=["plain", "fused"])
@pytest.mark.parametrize("chunk", [1, 8])
def test_step_updates_the_cache_in_place(chunk, batch):
    """The compiled step writes every layer's cache buffers in place: no copy of a cache-shaped
    array (a copy per layer per token would cost more than the attention itself), except in the
    branch that re-rotates the ring when a stream enters a new lap, once per W tokens."""
    cfg = tiny_config(num_layers=3)
    assert (batch * cfg.layers[0].attention.num_kv_heads >= attention.FUSED_MIN_PAIRS) == (
        batch == 8
    )
    m = tiny_model(cfg, random_flat_params(cfg))
    cache = kv.init_cache(cfg, StreamConfig(4, 2100), batch)  # sinks + 3 ring blocks
    tokens = jnp.zeros((batch, chunk), jnp.int32)
    hlo = (
        entry.step.lower(m.weights, cache, tokens, tokens > 0, graphdef=m.graphdef)
        .compile()
        .as_text()
    )
    cache_shapes = {
        "f32[{}]".format(",".join(map(str, x.shape))) for x in jax.tree.leaves(cache.layers)
    }
    branches = set(re.findall(r"branch_computations=\{([^}]*)\}", hlo))
    branches = {name.strip().lstrip("%") for group in branches for name in group.split(",")}
    computation, copies = None, []
    for line in hlo.splitlines():
        if header := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
            computation = header.group(1)
        elif " copy(" in line and any(f"= {shape}" in line for shape in cache_shapes):
            copies.append((computation, line.strip()[:120]))
    assert branches, "no rebase conditional found"
    outside_branches = [copy for copy in copies if copy[0] not in branches]
    assert outside_branches == []
    assert len(copies) <= 3 * (len(cache.layers[0].keys) - 1)  # one per ring block and layer
