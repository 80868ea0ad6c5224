"""Tiny random models in jaxsink's layout, and a loop that feeds a stream in fixed chunks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxsink import cache as kv
from jaxsink import model
from jaxsink.checkpoint import param_shapes
from jaxsink.config import ModelConfig, StreamConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        architecture="llama",
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_embeddings=True,
    )
    return ModelConfig(**(base | overrides))


def random_flat_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm"):
            flat[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            flat[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return flat


def to_params(flat: dict, dtype=jnp.float32):
    return model.unflatten(flat, dtype)


def feed(
    params, cfg: ModelConfig, stream: StreamConfig, tokens: np.ndarray, chunk: int, cache=None
):
    """Feed tokens [B, N] in chunks of `chunk` (last one padded); returns (logits [B, N, V], cache)."""
    B, N = tokens.shape
    cache = kv.init_cache(cfg, stream, B) if cache is None else cache
    outs = []
    for i in range(0, N, chunk):
        part = tokens[:, i : i + chunk]
        n = part.shape[1]
        padded = np.zeros((B, chunk), np.int32)
        padded[:, :n] = part
        valid = np.zeros((B, chunk), bool)
        valid[:, :n] = True
        logits, cache = model.step(params, cache, padded, valid, cfg)
        outs.append(np.asarray(logits)[:, :n])
    return np.concatenate(outs, axis=1), cache
