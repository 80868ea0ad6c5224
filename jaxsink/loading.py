"""`jaxsink.load`: a checkpoint folder (or anything `resolve_model` converts) -> a ready Model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsink import model as mdl
from jaxsink.checkpoint import DTYPES, load_params, read_config
from jaxsink.config import ConfigError, ModelConfig
from jaxsink.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config, params pytree on device, tokenizer."""

    cfg: ModelConfig
    params: mdl.Params
    tokenizer: Tokenizer
    path: Path

    @property
    def dtype(self):
        return self.params["embed"].dtype


def load(spec: str | os.PathLike | None = None, dtype: str | None = None) -> Model:
    """Load a model.

    spec: a jaxsink checkpoint folder; or a Hugging Face folder, a `.gguf` file or a hub id,
    converted once and cached (see `jaxsink.default_model.resolve_model`); None = the default
    SmolLM2-135M-Instruct, fetched and converted on first use.
    dtype: "float32" or "bfloat16" at run time (default: the checkpoint's dtype).
    """
    from jaxsink.default_model import resolve_model

    path = resolve_model(None if spec is None else str(spec))
    cfg, meta = read_config(path)
    dtype = dtype or meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    flat = load_params(path, cfg)
    target = jnp.dtype(DTYPES[dtype])
    params = jax.block_until_ready(mdl.unflatten(flat, target))
    return Model(
        cfg=cfg, params=params, tokenizer=Tokenizer(path, cfg.eos_token_ids), path=Path(path)
    )
