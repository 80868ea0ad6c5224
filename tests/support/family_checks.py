"""Checks every converted family goes through (tests/test_architectures.py and
tests/test_modern_families.py): dense logits against PyTorch, a sink stream against the
streaming reference."""

from __future__ import annotations

import numpy as np

from jaxsink.config import StreamConfig
from jaxsink.traced import entry
from tests.hf_tiny import torch_logits
from tests.spec_reference import stream_logits
from tests.tiny import feed


def assert_dense_matches_pytorch(torch_model, model) -> None:
    """Two streams of 40 tokens in dense mode: logits within 1e-4 of the PyTorch model's."""
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(2, 40))
    ids = ids.astype(np.int32)
    got, _ = feed(model, StreamConfig(0, 48, "dense"), ids, chunk=16)
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
