"""The jaxsink checkpoint: a folder with `config.json`, `model.safetensors`, tokenizer files and
the completeness marker `complete.json`, written last.

The weights are the `nnx.Param`s of `jaxsink.traced.decoder.Decoder`, each stored under its path in the
module (`embed`, `layers.0.attn.qkv`, ...), in exactly the layout the model runs on (see
`param_shapes`): loading is reading, and the logical axis names the module gives each weight
shard it on a `Mesh`. The parts of a quantized weight (`layers.0.attn.qkv.codes`, `.scales`,
`.mins`) keep their format's own bytes (4-bit codes two per byte, float16 scales), which
loading widens exactly (`jaxsink.traced.quant.Stored`). `config.json` holds the `ModelConfig`, one
description per layer (which weights are quantized included).

A checkpoint is written into a temporary sibling folder and renamed into place once complete;
loading also requires the marker and the weights' size it records, so no interrupted or
truncated write ever loads. Safetensors headers are checked against the file's bytes before
safetensors reads them, so a hostile header cannot make a reader allocate or read past the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsink.config import DTYPES, ConfigError, ModelConfig
from jaxsink.files import CheckpointError, check_safetensors, read_json_object

FORMAT = "jaxsink"
FORMAT_VERSION = 3  # 3: the NNX module's parameters, per layer (2: stacked layers)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPLETE_FILE = "complete.json"  # written last: {"weights_bytes": size of WEIGHTS_FILE}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape in the checkpoint: the `jaxsink.traced.decoder.Decoder` module's
    own parameters (`layout.checkpoint_layout`)."""
    return {name: shape for name, (shape, _) in _layout(cfg).items()}


def _layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    from jaxsink.layout import checkpoint_layout

    return checkpoint_layout(cfg)


def check_params(cfg: ModelConfig, params: Mapping[str, np.ndarray]) -> None:
    """Raise CheckpointError unless `params` has exactly the names and shapes of `param_shapes`
    (and the parts of quantized weights their own dtypes)."""
    want = _layout(cfg)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    if missing:
        raise CheckpointError(f"missing weights: {', '.join(missing)}")
    if extra:
        raise CheckpointError(f"unexpected weights: {', '.join(extra)}")
    for name, (shape, dtype) in want.items():
        if tuple(params[name].shape) != shape:
            raise CheckpointError(
                f"weight {name} has shape {tuple(params[name].shape)}, expected {shape}"
            )
        if dtype is not None and params[name].dtype != dtype:
            raise CheckpointError(f"weight {name} has dtype {params[name].dtype}, expected {dtype}")


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before any work unless a checkpoint can be written at `out`: it must not exist
    (unless `overwrite` and it is a folder) and its nearest existing ancestor must be a folder
    this process can create folders in (tried, not inferred from permission bits, which root
    and read-only file systems defeat). Leaves nothing behind. Returns `out` as a Path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file, not a folder: choose another output path")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise CheckpointError(
            f"cannot write the output {out}: {parent} is not a writable folder ({e.strerror}): "
            "choose another output path or fix its permissions"
        ) from None
    return out


def save_checkpoint(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray],
    dtype: str,
    tokenizer_files: Mapping[str, bytes],
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary sibling folder, flushed to
    disk with the completeness marker last, that is renamed onto `out` only once complete, so a
    failure or a kill leaves nothing at `out` (and an existing `out` is replaced only when
    `overwrite` and only after success).

    tokenizer_files: file name -> contents (`tokenizer.json` and its companions; none for a
      model converted without a tokenizer, which then takes token ids only).
    dtype: the float weights' dtype; the parts of quantized weights keep their own.
    """
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    out = check_writable(out, overwrite)
    check_params(cfg, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is shared
    layout = _layout(cfg)
    try:
        arrays = {
            name: np.ascontiguousarray(
                np.asarray(a).astype(layout[name][1] or DTYPES[dtype], copy=False)
            )
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
        for path in tmp.iterdir():
            _fsync(path)
        marker = {"weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size}
        (tmp / COMPLETE_FILE).write_text(json.dumps(marker) + "\n")
        _fsync(tmp / COMPLETE_FILE)
        _fsync(tmp)
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
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename after it never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """The ModelConfig of a complete checkpoint folder and its full metadata dict.

    Raises CheckpointError (ConfigError for values out of range) naming the file.
    """
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a jaxsink checkpoint (no {CONFIG_FILE})")
    meta = read_json_object(cfg_file)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a jaxsink checkpoint (convert it first: jaxsink-convert SRC OUT)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')}, "
            f"this jaxsink reads {FORMAT_VERSION}: convert its source again"
        )
    _check_complete(path)
    try:
        cfg = ModelConfig.from_dict(meta.get("model"))
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e} (convert the model again)") from None
    return cfg, meta


def _check_complete(path: Path) -> None:
    """Refuse a checkpoint whose completeness marker is absent (an interrupted write, or a
    checkpoint from before markers) or whose weights are not the size it records."""
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is incomplete (no {COMPLETE_FILE}: its writing was interrupted, or an "
            "older jaxsink wrote it): convert its source again"
        )
    want = read_json_object(marker).get("weights_bytes")
    weights = path / WEIGHTS_FILE
    got = weights.stat().st_size if weights.is_file() else None
    if got != want:
        raise CheckpointError(
            f"corrupt weights file {weights}: {got} bytes where {marker} records {want} "
            "(truncated or replaced): convert its source again"
        )


def load_params(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The weights of a checkpoint folder as numpy arrays, checked against `param_shapes`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    check_safetensors(weights)
    try:
        params = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {weights}: {e}") from None
    check_params(cfg, params)
    return params
