"""The jaxsink checkpoint: a folder with `config.json`, `model.safetensors` and tokenizer files.

The weights are the `nnx.Param`s of `jaxsink.model.Decoder`, each stored under its path in the
module (`embed`, `layers.0.attn.qkv`, ...), in exactly the layout the model runs on (see
`param_shapes`): loading is reading, and the logical axis names the module gives each weight
shard it on a `Mesh`. `config.json` holds the `ModelConfig`, one description per layer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxsink.config import ConfigError, JaxsinkError, ModelConfig

FORMAT = "jaxsink"
FORMAT_VERSION = 3  # 3: the NNX module's parameters, per layer (2: stacked layers)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(JaxsinkError):
    """A checkpoint is missing, incomplete or corrupt."""


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape: the `jaxsink.model.Decoder` module's own parameters."""
    from jaxsink.model import param_shapes as module_shapes

    return module_shapes(cfg)


def check_params(cfg: ModelConfig, params: Mapping[str, np.ndarray]) -> None:
    """Raise CheckpointError unless `params` has exactly the names and shapes of `param_shapes`."""
    want = param_shapes(cfg)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    if missing:
        raise CheckpointError(f"missing weights: {', '.join(missing)}")
    if extra:
        raise CheckpointError(f"unexpected weights: {', '.join(extra)}")
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise CheckpointError(
                f"weight {name} has shape {tuple(params[name].shape)}, expected {shape}"
            )


def save_checkpoint(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray],
    dtype: str,
    tokenizer_files: Mapping[str, bytes],
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary sibling folder that is
    renamed onto `out` only once complete, so a failure leaves nothing at `out` (and an
    existing `out` is replaced only when `overwrite` and only after success).

    tokenizer_files: file name -> contents (`tokenizer.json` and its companions; none for a
      model converted without a tokenizer, which then takes token ids only).
    """
    from safetensors.numpy import save_file

    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")
    check_params(cfg, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is shared
    try:
        arrays = {
            name: np.ascontiguousarray(np.asarray(a).astype(DTYPES[dtype], copy=False))
            for name, a in params.items()
        }
        save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "source": source,
            "model": cfg.to_dict(),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
        if out.exists() and overwrite:  # else a concurrent writer won: rename fails
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """The ModelConfig of a checkpoint folder and its full metadata dict."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a jaxsink checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a jaxsink checkpoint (convert it first: jaxsink-convert SRC OUT)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')}, "
            f"this jaxsink reads {FORMAT_VERSION}: convert its source again"
        )
    return ModelConfig.from_dict(meta["model"]), meta


def load_params(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The weights of a checkpoint folder as numpy arrays, checked against `param_shapes`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    try:
        params = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {weights}: {e}") from None
    check_params(cfg, params)
    return params
