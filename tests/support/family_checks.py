"""Checks every converted family goes through (tests/test_families.py, and
tests/test_transformers_sweep.py's dense logits): dense logits against PyTorch, a sink stream
against the streaming reference."""

from __future__ import annotations

import numpy as np

from jaxsink.config import StreamConfig
from jaxsink.traced import entry
from tests.support.hf_tiny import torch_logits
from tests.support.spec_reference import stream_logits
from tests.support.tiny import feed


def assert_dense_matches_pytorch(
    torch_model,
    model,
    batch: int = 2,
    tokens: int = 40,
    capacity: int = 48,
    chunk: int = 16,
    seed: int = 0,
) -> None:
    """`batch` random streams (seed `seed`) of `tokens`, fed `chunk` at a time into a dense cache
    of `capacity` slots: logits within 1e-4 of the PyTorch model's. By default two streams of 40
    tokens."""
    ids = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, size=(batch, tokens))
    ids = ids.astype(np.int32)
    got, _ = feed(model, StreamConfig(0, capacity, "dense"), ids, chunk=chunk)
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def assert_sink_stream_matches_reference(model, flat, n_tokens: int) -> None:
    """S = 2, W = 5 over `n_tokens` (many evictions), chunk 1 and 8, each at most one compile:
    logits within 1e-4 of the streaming reference."""
    ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, size=(1, n_tokens))
    ids = ids.astype(np.int32)
    want = stream_logits(flat, model.cfg, ids[0], 2, 5)
    for chunk in (1, 8):
        before = entry.TRACES["step"]
        got, _ = feed(model, StreamConfig(2, 5), ids, chunk=chunk)
        assert entry.TRACES["step"] - before <= 1  # at most one compile for this shape
        np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)
