"""Tiny random models in jaxsink's layout, and a loop that feeds a stream in fixed chunks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxsink import cache as kv
from jaxsink import model
from jaxsink.checkpoint import param_shapes
from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary, StreamConfig
from jaxsink.engine import padded_chunks
from jaxsink.loading import Model

RMS = Norm("rms", 1e-5)
SILU_MLP = Mlp(48, "silu")


def tiny_config(
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    norm: Norm = RMS,
    mlp: Mlp = SILU_MLP,
    residual: str = "sequential",
    position=None,
    **attention,
) -> ModelConfig:
    """A small Llama-shaped model; every part of its layers can be replaced by keyword."""
    position = Rotary(10000.0, head_dim) if position is None else position
    spec = Attention(num_heads, num_kv_heads, head_dim, position, head_dim**-0.5, **attention)
    return ModelConfig(
        architecture="llama",
        vocab_size=97,
        hidden_size=32,
        layers=(LayerSpec(spec, mlp, norm, residual),) * num_layers,
        final_norm=norm,
        max_position_embeddings=128,
        tie_embeddings=True,
    )


def random_flat_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """Random checkpoint arrays: norms near their identity, everything else N(0, scale)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        noise = rng.standard_normal(shape)
        if name.endswith("norm.scale"):
            plus_one = "rms_plus_one" in (cfg.final_norm.kind, cfg.layers[0].norm.kind)
            flat[name] = (0.1 * noise if plus_one else 1 + 0.1 * noise).astype(np.float32)
        else:
            flat[name] = (scale * noise).astype(np.float32)
    return flat


def tiny_model(cfg: ModelConfig, flat: dict, dtype=jnp.float32) -> Model:
    """A `jaxsink.Model` (no tokenizer) holding the checkpoint arrays `flat`."""
    graphdef, weights = model.from_flat(cfg, flat, dtype)
    return Model(cfg=cfg, graphdef=graphdef, weights=weights, tokenizer=None, path=None)


def feed(m: Model, stream: StreamConfig, tokens: np.ndarray, chunk: int, cache=None):
    """Feed tokens [B, N] in chunks of `chunk` (last one padded); returns (logits [B, N, V], cache)."""
    cache = kv.init_cache(m.cfg, stream, tokens.shape[0], m.dtype) if cache is None else cache
    outs = []
    for padded, valid, n in padded_chunks(tokens, chunk):
        logits, cache = model.step(m.weights, cache, padded, valid, graphdef=m.graphdef)
        outs.append(np.asarray(logits)[:, :n])
    return np.concatenate(outs, axis=1), cache
