"""Converted tiny random transformers models against their PyTorch originals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxsink
from jaxsink.convert import convert
from tests.hf_tiny import VOCAB, tiny_hf_model
from tests.tiny import feed
from tests.torch_reference import reference_nll

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def _convert_and_load(tmp_path, arch, **overrides):
    hf = tiny_hf_model(arch, tmp_path / "hf", **overrides)
    convert(tmp_path / "hf", tmp_path / "js", progress=False)
    return hf, jaxsink.load(tmp_path / "js")


@pytest.mark.parametrize("kv", list(HEADS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_dense_logits_match_transformers(tmp_path, arch, kv):
    hf, model = _convert_and_load(tmp_path, arch, num_key_value_heads=HEADS[kv])
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 45)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    stream = jaxsink.StreamConfig(0, 64, "dense")
    got, _ = feed(model, stream, ids, chunk=16)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        {"attention_bias": True},
    ],
    ids=["tied", "rope-linear", "rope-llama3", "attention-bias"],
)
def test_llama_variants_match_transformers(tmp_path, overrides):
    hf, model = _convert_and_load(tmp_path, "llama", **overrides)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, 200)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got, _ = feed(model, jaxsink.StreamConfig(0, 256, "dense"), ids, chunk=64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["sink", "window", "dense"])
def test_stream_nll_matches_torch_reference_loop(tmp_path, arch, mode):
    """Per-token NLL over a stream with many evictions equals the transformers reference loop."""
    from jaxsink.evaluate import stream_nll

    hf, model = _convert_and_load(tmp_path, arch)
    ids = np.random.default_rng(2).integers(0, VOCAB, size=161)
    sinks, window = 3, 13
    got = stream_nll(model, ids, mode, sinks, window, chunk=32, progress=False).nll
    ref_sinks, ref_window = {"sink": (3, 13), "window": (0, 16), "dense": (0, 0)}[mode]
    want = reference_nll(hf, ids, ref_sinks, ref_window, dense=mode == "dense")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
