"""The int8 cache (`--cache-dtype int8`): ring keys and values int8 with one float32 scale per
token and kv head, sinks exact (docs/streaming-contract.md, "An int8 cache").

Checked against the spec reference with the int8 cache's own contract (every ring token's key,
rotated by its ring offset, and value quantized once; a query sees them so), token by token and
in chunks, in the plain and the fused attention forms; sinks bit-equal to a float32 cache's;
stored keys that never drift however many laps the ring turns; one compile per shape; engine
rows, saved streams and shardings with the scales as extra leaves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxsink import plan
from jaxsink import sharding as sh
from jaxsink.config import StreamConfig
from jaxsink.engine import Engine, RowSampling
from jaxsink.stream_state import SavedStream, load_stream, read_stream_info, save_stream
from jaxsink.traced import cache as kv
from jaxsink.traced import entry
from tests.support.spec_reference import _rope, int8_round_trip, stream_logits
from tests.support.tiny import feed, random_flat_params, tiny_config, tiny_model

INT8 = kv.INT8
CFG = tiny_config(head_dim=16)  # 4 heads, 2 kv heads of 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(CFG, random_flat_params(CFG, seed=1))


def tokens(n: int, batch: int = 1, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, n)).astype(np.int32)


def int8_feed(m, stream, ids, chunk):
    cache = kv.init_cache(m.cfg, stream, ids.shape[0], INT8)
    return feed(m, stream, ids, chunk, cache=cache)


@pytest.mark.parametrize(
    ("stream", "chunk"),
    [
        (StreamConfig(2, 7), 1),
        (StreamConfig(2, 7), 16),
        (StreamConfig(3, 4), 5),
        (StreamConfig(0, 9, "window"), 5),
    ],
    ids=str,
)
def test_matches_the_int8_spec_reference(tiny, stream, chunk):
    """Over a stream that wraps the ring 5 to 12 times, one token at a time and in chunks
    (longer than W included): the logits of the spec reference with every ring key and value
    quantized as the contract says, within float rounding, while the quantization itself moves
    them by three orders of magnitude more (measured: 1e-5 against 0.2)."""
    flat = random_flat_params(CFG, seed=1)
    ids = tokens(60)
    want = stream_logits(flat, CFG, ids[0], stream.sinks, stream.window, int8=True)
    got, cache = int8_feed(tiny, stream, ids, chunk)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)
    exact = stream_logits(flat, CFG, ids[0], stream.sinks, stream.window)
    assert np.abs(got[0] - exact).max() > 0.05  # the reference tells int8 from float32 apart
    assert cache.dtype == INT8 and cache.int8


def test_dense_int8_matches_the_spec_reference(tiny):
    flat = random_flat_params(CFG, seed=1)
    ids = tokens(40, seed=3)
    want = stream_logits(flat, CFG, ids[0], 0, 40, dense=True, int8=True)
    got, _ = int8_feed(tiny, StreamConfig(0, 40, "dense"), ids, 8)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)


def test_native_sliding_layers_keep_an_int8_ring_of_their_own():
    """A native sliding-window layer (its own ring of w - 1 slots, no sinks) under a sink cache:
    both rings int8, each with its own ring offsets."""
    spec = CFG.layers[0]
    sliding = dataclasses.replace(
        spec, attention=dataclasses.replace(spec.attention, sliding_window=5)
    )
    cfg = dataclasses.replace(CFG, layers=(sliding, spec))
    flat = random_flat_params(cfg, seed=4)
    ids = tokens(40, seed=5)
    want = stream_logits(flat, cfg, ids[0], 2, 7, int8=True)
    got, cache = int8_feed(tiny_model(cfg, flat), StreamConfig(2, 7), ids, 3)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)
    assert [lc.stream for lc in cache.layers] == [StreamConfig(0, 4, "window"), StreamConfig(2, 7)]


def test_rows_of_a_batch_equal_their_streams_alone(tiny):
    """Eight rows at once, one token at a time: each row's logits equal its stream alone."""
    stream = StreamConfig(2, 7)
    ids = tokens(24, batch=8, seed=6)
    together, _ = int8_feed(tiny, stream, ids, 1)
    for b in (0, 5):
        alone, _ = int8_feed(tiny, stream, ids[b : b + 1], 1)
        np.testing.assert_allclose(together[b], alone[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 8])
def test_layers_without_rotary_read_the_ring_with_one_variant(batch):
    """ALiBi layers: no query rotations, the int8 ring read with one variant (and its bias)."""
    from jaxsink.config import Alibi

    cfg = tiny_config(head_dim=16, position=Alibi((0.5, 0.25, 0.125, 0.0625)))
    flat = random_flat_params(cfg, seed=11)
    ids = tokens(30, batch=batch, seed=12)
    got, _ = int8_feed(tiny_model(cfg, flat), StreamConfig(2, 7), ids, 3)
    want = stream_logits(flat, cfg, ids[-1], 2, 7, int8=True)
    np.testing.assert_allclose(got[-1], want, atol=1e-4, rtol=0)


def test_sinks_are_bit_equal_to_a_float32_caches(tiny):
    stream = StreamConfig(3, 6)
    ids = tokens(50, seed=7)
    _, exact = feed(tiny, stream, ids, 4)
    _, int8 = int8_feed(tiny, stream, ids, 4)
    for a, b in zip(exact.layers, int8.layers, strict=True):
        assert not isinstance(b.keys[0], kv.Int8Block) and b.keys[0].dtype == jnp.float32
        assert np.array_equal(np.asarray(a.keys[0]), np.asarray(b.keys[0]))
        assert np.array_equal(np.asarray(a.values[0]), np.asarray(b.values[0]))
        assert all(isinstance(x, kv.Int8Block) for x in (*b.keys[1:], *b.values[1:]))


def _layer0_keys(flat, ids) -> np.ndarray:
    """Every token's layer-0 key before rotation, float64: [N, Kh, H] (layer 0 reads only its
    token, so the float32 and int8 caches compute the same keys)."""
    a = CFG.layers[0].attention
    x = flat["embed"].astype(np.float64)[ids]  # [N, D]
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.layers[0].norm.eps)
    x = x * flat["layers.0.norm.scale"]
    return np.einsum("nd,khd->nkh", x, flat["layers.0.attn.qkv"][:, a.group])


def test_stored_keys_never_drift_over_many_laps(tiny):
    """Over 250 laps of a W = 8 ring, every stored ring key of layer 0 stays within half a
    quantum (its scale / 2) of the exact key rotated by its ring offset, checked at laps 1,
    50, 125 and 250: codes are written once and never re-rotated (no error can grow with the
    stream).

    The bound would fail for a cache that re-rotated int8 keys with a dequantize-rotate-
    requantize at each lap, as the float cache re-rotates its keys: simulated here on the same
    keys, one such lap already leaves elements 0.86 to 0.99 quanta off (measured at laps 1, 50 and
    250), past the bound.
    """
    stream = StreamConfig(2, 8)
    flat = random_flat_params(CFG, seed=1)
    spec = CFG.layers[0].attention.position
    ids = tokens(2 + 8 * 250, seed=8)
    exact = _layer0_keys(flat, ids[0])
    cache = kv.init_cache(CFG, stream, 1, INT8)
    done = 0
    for lap in (1, 50, 125, 250):
        upto = 2 + 8 * lap
        _, cache = feed(tiny, stream, ids[:, done:upto], 8, cache=cache)
        done = upto
        ring = cache.layers[0].keys[1]
        codes, scale = np.asarray(ring.codes[0]), np.asarray(ring.scale[0])  # [Kh, H, W]
        held = np.asarray(kv.slot_tokens(stream, cache.pos))[0, 2:]  # token of each ring slot
        want = np.stack(
            [_rope(exact[k], (k - 2) % 8, spec, stream.capacity + 1) for k in held], axis=-1
        )  # [Kh, H, W]
        error = np.abs(codes * scale - want) / scale
        assert error.max() <= 0.5 + 1e-3, (lap, error.max())
    # One dequantize -> rotate by -W -> requantize of the same keys (a re-rotating int8 cache).
    rotated = np.stack([_rope(exact[k], (k - 2) % 8 + 8, spec, 11) for k in held])  # [W, Kh, H]
    stored = _rope(int8_round_trip(rotated), -8, spec, 11)
    requantized = int8_round_trip(stored)
    ideal = np.stack([_rope(exact[k], (k - 2) % 8, spec, 11) for k in held])
    quantum = np.abs(requantized).max(axis=-1, keepdims=True) / 127
    assert (np.abs(requantized - ideal) / quantum).max() > 0.6


def test_logit_error_does_not_grow_with_the_stream(tiny):
    """Against the float32 cache over 300 laps of W = 6, the logits' mean error in the last
    30 laps is no larger than in laps 5 to 35 (measured: 0.0184 and 0.0183)."""
    stream = StreamConfig(2, 6)
    ids = tokens(2 + 6 * 300, seed=9)
    exact, _ = feed(tiny, stream, ids, 32)
    int8, _ = int8_feed(tiny, stream, ids, 32)
    error = np.abs(int8[0] - exact[0]).mean(axis=-1)
    early, late = error[2 + 6 * 5 : 2 + 6 * 35].mean(), error[-6 * 30 :].mean()
    assert 0 < late <= 1.5 * early, (early, late)


def test_one_compile_per_shape_over_a_long_stream(tiny):
    stream = StreamConfig(3, 7)  # a layout no other test compiles
    cache = kv.init_cache(CFG, stream, 1, INT8)
    before = entry.TRACES["step"]
    ids = tokens(700, seed=10)
    _, cache = feed(tiny, stream, ids, 16, cache=cache)
    nbytes = cache.nbytes
    _, cache = feed(tiny, stream, ids[:, :40], 1, cache=cache)
    assert entry.TRACES["step"] - before == 2  # C = 16 and C = 1, for 740 tokens and 105 laps
    assert cache.nbytes == nbytes == kv.cache_bytes(CFG, stream, 1, INT8)


def test_bytes_fall_by_the_width_minus_sinks_and_scales():
    """SmolLM2-135M's shapes at K = 1024: int8 ring (1 byte) + one float32 scale per 64, float32
    sinks: 0.27x the float32 cache, 0.53x bfloat16's."""
    from jaxsink.config import Attention, Rotary

    attention = Attention(9, 3, 64, Rotary(1e5, 64), 0.125)
    cfg = dataclasses.replace(
        CFG, layers=(dataclasses.replace(CFG.layers[0], attention=attention),) * 30
    )
    stream = StreamConfig(4, 1020)
    f32, bf16, i8 = (kv.cache_bytes(cfg, stream, 1, d) for d in (jnp.float32, jnp.bfloat16, INT8))
    want = (4 * 4 * 64 + 1020 * (64 + 4)) / (1024 * 4 * 64)  # per layer, head and key or value
    assert i8 / f32 == pytest.approx(want, rel=1e-4)
    assert i8 / f32 < 0.27 and i8 / bf16 < 0.54


# --- engine, saved streams, shardings -------------------------------------------------------

STREAM = StreamConfig(2, 5)
PROMPTS = [[5, 17, 3, 88, 41, 9, 60, 22, 14], [30, 2, 90, 11, 4, 8]]
SAMPLING = RowSampling(temperature=0.9, top_k=20, seed=3, max_tokens=16)


def _drain(engine, row):
    out = []
    while engine.live[row]:
        out += engine.decode()[row]
    return out


def test_engine_rows_with_an_int8_cache_equal_streams_alone(tiny):
    alone = []
    for prompt in PROMPTS:
        engine = Engine(tiny, 1, STREAM, chunk=4, block=5, cache_dtype="int8")
        alone.append(_drain(engine, engine.insert(prompt, SAMPLING)))
    engine = Engine(tiny, 2, STREAM, chunk=4, block=5, cache_dtype="int8")
    assert engine.cache.dtype == INT8 and engine.compiles == 2
    rows = [engine.insert(p, SAMPLING) for p in PROMPTS]
    got = {r: [] for r in rows}
    while engine.live.any():
        for r, new in enumerate(engine.decode()):
            got.setdefault(r, []).extend(new)
    assert [got[r] for r in rows] == alone


def test_a_saved_int8_stream_resumes_bit_for_bit(tiny, tmp_path):
    """Export after 13 tokens, save, load, restore into a new engine, 11 more: the same tokens
    as 24 in one go; the file holds codes and scales bit for bit and says `int8`."""
    whole_engine = Engine(tiny, 1, STREAM, chunk=4, block=5, cache_dtype="int8")
    whole = _drain(
        whole_engine, whole_engine.insert(PROMPTS[0], dataclasses.replace(SAMPLING, max_tokens=24))
    )
    engine = Engine(tiny, 1, STREAM, chunk=4, block=5, cache_dtype="int8")
    row = engine.insert(PROMPTS[0], dataclasses.replace(SAMPLING, max_tokens=13))
    head = _drain(engine, row)
    state = engine.export(row)
    path = save_stream(tmp_path / "s.stream", SavedStream(row=state, settings={}, decoder={}), tiny)
    assert read_stream_info(path).cache_dtype == "int8"
    loaded = load_stream(path, tiny)
    assert loaded.cache_dtype == "int8" and loaded.row.index == state.index
    a, b = jax.tree.leaves(state.cache.layers), jax.tree.leaves(loaded.row.cache.layers)
    assert [x.dtype for x in a] == [x.dtype for x in b] and np.int8 in [x.dtype for x in b]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    again = Engine(tiny, 1, STREAM, chunk=4, block=5, cache_dtype="int8")
    row = again.restore(loaded.row, SAMPLING)
    again.arm(row, dataclasses.replace(SAMPLING, max_tokens=11))
    assert head + _drain(again, row) == whole


def test_scales_shard_like_their_codes():
    """Batch rows over `data`, kv heads over `model`: an int8 block's codes and scales alike, as
    the float buffers; `jaxsink plan` counts them per device."""
    cfg = tiny_config(num_kv_heads=2)
    mesh = AbstractMesh((2, 2), ("data", "model"))
    cache = jax.eval_shape(lambda: kv.init_cache(cfg, StreamConfig(2, 6), 4, INT8))
    specs = [tuple(s.spec) for s in jax.tree.leaves(sh.cache_shardings(cache, mesh).layers)]
    assert len(specs) == len(jax.tree.leaves(cache.layers)) == 2 * 2 * 3
    assert set(specs) == {("data", "model", None, None)}
    sizes = plan._sizes(sh.MeshSpec(data=2, model=2))
    per_device = plan.cache_bytes(cfg, StreamConfig(2, 6), 4, INT8, sizes)
    layers = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
    assert per_device == layers // 4 + 2 * 4 * 4 // 2  # cache over 4 devices, pos / epoch over 2
