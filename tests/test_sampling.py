"""Sampling on device, each row with its own settings: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsink.config import ConfigError
from jaxsink.generate import Sampling
from jaxsink.traced.sampling import _threshold, sample_rows

jitted_rows = jax.jit(sample_rows)


def sample(logits, key, sampling: Sampling, axis: int = -1):
    """Every row of logits [B, V] (or [V, B] with axis 0) drawn with the same settings."""
    logits = jnp.moveaxis(logits, axis, 0)  # [V, B]
    B = logits.shape[1]

    def row(x, dtype):
        return jnp.full((B,), x, dtype)

    return jitted_rows(
        logits,
        jax.random.split(key, B),
        row(sampling.temperature, jnp.float32),
        row(sampling.top_k, jnp.int32),
        row(sampling.top_p, jnp.float32),
    )


def _logits(seed=0, batch=4, vocab=50):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, vocab)) * 3, jnp.float32)


def _draws(logits, sampling, n=200):
    keys = jax.random.split(jax.random.key(0), n)
    return np.stack([np.asarray(sample(logits, k, sampling)) for k in keys])  # [n, B]


def test_greedy_is_argmax():
    logits = _logits()
    np.testing.assert_array_equal(sample(logits, jax.random.key(1), Sampling()), logits.argmax(-1))


def test_greedy_takes_the_first_of_tied_best_and_stays_in_range():
    logits = np.zeros((3, 10), np.float32)
    logits[0, [2, 7]] = 5.0  # a tie: the first index wins, as argmax
    logits[1, 9] = 1.0
    logits[2, 4] = np.nan  # no largest value: an in-range index all the same
    got = np.asarray(sample(jnp.asarray(logits), jax.random.key(0), Sampling()))
    assert list(got[:2]) == [2, 9]
    assert 0 <= got[2] < 10


def test_top_k_only_draws_the_k_best():
    logits = _logits()
    draws = _draws(logits, Sampling(temperature=1.0, top_k=3))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for b in range(logits.shape[0]):
        assert set(draws[:, b]) <= set(top3[b])
        assert len(set(draws[:, b])) > 1  # it does sample


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    draws = _draws(logits, Sampling(temperature=1.0, top_p=0.7))
    assert set(draws[:, 0]) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    tiny = _draws(logits, Sampling(temperature=1.0, top_p=0.01), n=20)
    assert set(tiny[:, 0]) == {0}  # the best token always stays


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    draws = _draws(logits, Sampling(temperature=1.0), n=2000)[:, 0]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.05)


@pytest.mark.parametrize(
    "sampling", [Sampling(), Sampling(temperature=0.8, top_k=10, top_p=0.9)], ids=["greedy", "topk"]
)
def test_vocabulary_major_logits_draw_the_same(sampling):
    logits = _logits()  # the decode loop samples [V, B] logits along axis 0
    key = jax.random.key(3)
    want = sample(logits, key, sampling)
    np.testing.assert_array_equal(sample(logits.T, key, sampling, axis=0), want)


def test_same_seed_same_draws():
    logits = _logits()
    s = Sampling(temperature=0.8, top_k=10, top_p=0.9)
    a = sample(logits, jax.random.key(5), s)
    b = sample(logits, jax.random.key(5), s)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}]
)
def test_bad_sampling_is_refused(kwargs):
    with pytest.raises(ConfigError):
        Sampling(**kwargs)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_nucleus_bisection_equals_the_sorted_definition(top_p):
    """Keep token i iff the mass of strictly better tokens is < top_p (up to float summation)."""
    logits = jax.random.normal(jax.random.key(0), (8, 5000)) * 2
    p = jax.nn.softmax(logits, axis=-1).T  # [V, B]
    threshold = _threshold(p, lambda above: (p * above).sum(axis=0) >= top_p)
    got = np.asarray(p >= threshold).T
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, -1)
    before = np.take_along_axis(np.cumsum(sorted_probs, -1) - sorted_probs, np.argsort(order), -1)
    want = before < top_p
    borderline = np.abs(before - top_p) < 1e-5
    assert np.all((got == want) | borderline)
    assert np.all(got.sum(-1) >= 1)


def test_rows_keep_their_own_settings():
    """One call, rows with different settings: each row draws as if alone."""
    logits = _logits(batch=3)
    keys = jax.random.split(jax.random.key(7), 3)
    temperature = jnp.asarray([0.0, 0.9, 1.2])
    top_k, top_p = jnp.asarray([0, 4, 0]), jnp.asarray([1.0, 1.0, 0.6])
    together = np.asarray(jitted_rows(logits.T, keys, temperature, top_k, top_p))
    for b in range(3):
        alone = jitted_rows(logits[b : b + 1].T, keys[b : b + 1], temperature[b : b + 1],
                            top_k[b : b + 1], top_p[b : b + 1])  # fmt: skip
        assert int(alone[0]) == together[b]
