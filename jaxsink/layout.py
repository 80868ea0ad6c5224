"""The parameter layout: every weight's checkpoint name (its NNX attribute path, a format:
never rename), its shape and stored form, derived from the module itself; and the module's
state built from a checkpoint's flat arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink.config import ModelConfig
from jaxsink.traced.decoder import Decoder


def abstract(cfg: ModelConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, weights state of `jax.ShapeDtypeStruct`s) of `Decoder(cfg)`, allocating
    nothing: the shapes and logical axes every checkpoint and conversion follow."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, dtype)))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's name (its path in the module, dot-joined, e.g. `layers.0.attn.qkv`, or
    `layers.0.attn.qkv.codes` for a part of a quantized one) and shape in memory, derived from
    the module itself."""
    _, state = abstract(cfg)
    return {name_of(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def checkpoint_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """Every weight's checkpoint name, its shape in the checkpoint and its dtype there: None
    for a float weight (kept in the checkpoint's float dtype), the `quant.Stored` dtype for a
    part of a quantized one (whose shape there may differ: 4-bit codes two per byte)."""
    _, state = abstract(cfg)
    layout = {}
    for path, v in nnx.to_flat_state(state):
        stored = v.get_metadata().get("stored")
        shape = tuple(v.shape)
        layout[name_of(path)] = (
            (shape, None) if stored is None else (stored.shape(shape), np.dtype(stored.dtype))
        )
    return layout


def name_of(path) -> str:
    return ".".join(map(str, path))


def from_stored(var: nnx.Variable, array: np.ndarray, dtype) -> np.ndarray:
    """A checkpoint array (or a shard of it) in the memory form of weight `var` (abstract):
    a float weight cast to `dtype`, a part of a quantized one decoded (`quant.Stored`)."""
    stored = var.get_metadata().get("stored")
    if stored is None:
        return array.astype(dtype, copy=False)
    return stored.decode(array, var.get_value().dtype)


def from_flat(
    cfg: ModelConfig, flat: dict[str, np.ndarray], dtype
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, weights) of `Decoder(cfg)` holding the checkpoint arrays `flat` (names of
    `checkpoint_layout`), each its own device buffer, float weights cast to `dtype`."""
    graphdef, state = abstract(cfg, dtype)
    flat_state = nnx.to_flat_state(state)
    for path, var in flat_state:
        var.set_value(jnp.asarray(from_stored(var, np.asarray(flat[name_of(path)]), dtype)))
    return graphdef, nnx.from_flat_state(flat_state)


def param_bytes(weights) -> int:
    """Total bytes of a weights pytree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(weights))
