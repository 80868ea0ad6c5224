"""The jaxsink checkpoint: a folder with `config.json`, `model.safetensors` and tokenizer files.

Parameters are a flat dict of arrays named like `layers.wq`; per-layer weights are stacked along
a leading layer axis and attention weights keep explicit head axes (see `param_shapes`), so a
`Mesh` can shard them by name (heads, mlp, vocab) without reshaping. Matrices are output-major,
[out, in] like a torch Linear: the layout the model's products read fastest (see
`jaxsink.model.unflatten`), so conversion mostly reshapes.
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
FORMAT_VERSION = 2  # 2: matrices output-major (1: input-major)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(JaxsinkError):
    """A checkpoint is missing, incomplete or corrupt."""


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape. Letters: L layers, D hidden, N heads, K kv heads,
    H head dim, F mlp, V vocab."""
    L, D, N, K, H, F, V = (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    shapes = {
        "embed": (V, D),
        "final_norm": (D,),
        "layers.attn_norm": (L, D),
        "layers.wq": (L, N, H, D),
        "layers.wk": (L, K, H, D),
        "layers.wv": (L, K, H, D),
        "layers.wo": (L, D, N, H),
        "layers.mlp_norm": (L, D),
        "layers.w_gate": (L, F, D),
        "layers.w_up": (L, F, D),
        "layers.w_down": (L, D, F),
    }
    if cfg.qkv_bias:
        shapes |= {"layers.bq": (L, N, H), "layers.bk": (L, K, H), "layers.bv": (L, K, H)}
    if cfg.out_bias:
        shapes["layers.bo"] = (L, D)
    if cfg.mlp_bias:
        shapes |= {"layers.b_gate": (L, F), "layers.b_up": (L, F), "layers.b_down": (L, D)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


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

    tokenizer_files: file name -> contents (at least `tokenizer.json`).
    """
    from safetensors.numpy import save_file

    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")
    if "tokenizer.json" not in tokenizer_files:
        raise CheckpointError("a checkpoint needs tokenizer.json")
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
