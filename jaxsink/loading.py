"""`jaxsink.load`: a checkpoint folder (or anything `resolve_model` converts) -> a ready Model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsink import model as mdl
from jaxsink.checkpoint import DTYPES, load_params, read_config
from jaxsink.config import ConfigError, ModelConfig
from jaxsink.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config, the network as NNX (graph definition + weights state on
    device), tokenizer.

    `module` is the `nnx.Module` itself (`jaxsink.model.Decoder`); `graphdef` and `weights`
    are its `nnx.split`, what the jitted entry points take (`weights` as an argument,
    `graphdef` static).
    """

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    weights: nnx.State
    tokenizer: Tokenizer
    path: Path

    @property
    def module(self) -> mdl.Decoder:
        return nnx.merge(self.graphdef, self.weights)

    @property
    def dtype(self):
        return self.weights["embed"][...].dtype


def load(
    spec: str | os.PathLike | None = None, dtype: str | None = None, progress: bool = True
) -> Model:
    """Load a model.

    spec: a jaxsink checkpoint folder; or a Hugging Face folder, a `.gguf` file or a hub id,
    converted once and cached (see `jaxsink.default_model.resolve_model`); None = the default
    SmolLM2-135M-Instruct, fetched and converted on first use.
    dtype: "float32" or "bfloat16" at run time (default: the checkpoint's dtype).
    progress: say on stderr what is fetched, converted or waited for.
    """
    from jaxsink.default_model import resolve_model

    path = resolve_model(None if spec is None else str(spec), progress=progress)
    cfg, meta = read_config(path)
    dtype = dtype or meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    flat = load_params(path, cfg)
    target = jnp.dtype(DTYPES[dtype])
    graphdef, weights = jax.block_until_ready(mdl.from_flat(cfg, flat, target))
    return Model(
        cfg=cfg,
        graphdef=graphdef,
        weights=weights,
        tokenizer=Tokenizer(path, cfg.eos_token_ids),
        path=Path(path),
    )
