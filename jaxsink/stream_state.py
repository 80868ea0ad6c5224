"""A stream saved to disk and resumed: one safetensors file holding the row's cache, next-token
logits and PRNG key, with a JSON header (safetensors metadata) holding everything else.

The JSON records the format version, the model's identity (its config's and weights' digests,
its dtype), the stream layout (sinks, window, mode, cache dtype), the exact stream index, the
generation settings, the detokenizer's held-back ids and whatever the caller keeps with the
stream (a chat's messages). Restoring it into an engine of the same model and layout continues
the stream bit for bit; another model or layout is refused with a line saying which.

Why safetensors and not Orbax: a stream is one row of a few MiB that a server saves and loads
per idle session; one file written to a temporary name and renamed is atomic, reads with the
header checked before anything is allocated (`files.check_safetensors`), and needs no
extra dependency or folder per stream. Orbax's strength, sharded multi-host arrays, is what a
single row does not need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxsink import settings
from jaxsink.checkpoint import WEIGHTS_FILE
from jaxsink.config import CACHE_DTYPES, DTYPES, ConfigError, JaxsinkError, StreamConfig
from jaxsink.engine import RowState
from jaxsink.files import CheckpointError, check_safetensors
from jaxsink.loading import Model
from jaxsink.traced import cache as kv

FORMAT = "jaxsink-stream"
FORMAT_VERSION = 1


class StreamFileError(JaxsinkError):
    """A saved stream cannot be read, or does not belong to this model or layout."""


@dataclasses.dataclass
class SavedStream:
    """A stream's whole state.

    row: the engine row's device state (`Engine.export`); settings: how it was generated (the
    keyword arguments of `jaxsink.generate`, JSON values); decoder: the detokenizer's state
    (`IncrementalDecoder.state`); pending: tokens the stream produced but has not consumed yet
    (an EOS that stopped it), fed first when it goes on; extra: anything the caller keeps.
    """

    row: RowState
    settings: dict
    decoder: dict
    pending: list[int] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def stream(self) -> StreamConfig:
        return self.row.cache.stream

    @property
    def cache_dtype(self) -> str:
        return _dtype_name(self.row.cache.dtype, CACHE_DTYPES)


def _dtype_name(dtype, names=DTYPES) -> str:
    return next(name for name, d in names.items() if d == np.dtype(dtype))


def model_identity(model: Model) -> dict:
    """What a saved stream must be resumed with: the config's digest, a digest of the weights
    file (its size and 16 spans of 64 KiB across it: cheap, and different for any two
    checkpoints that differ in more than a few weights) and the run-time dtype."""
    config = json.dumps(model.cfg.to_dict(), sort_keys=True).encode()
    weights = None
    if model.path is not None and (model.path / WEIGHTS_FILE).is_file():
        weights = _sampled_digest(model.path / WEIGHTS_FILE)
    return {
        "name": model.path.name if model.path is not None else None,
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "weights_digest": weights,
        "dtype": _dtype_name(model.dtype),
    }


def _sampled_digest(path: Path, spans: int = 16, span: int = 1 << 16) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(spans):
            f.seek(max(0, (size - span) * i // max(spans - 1, 1)))
            digest.update(f.read(span))
    return digest.hexdigest()


def check_save_path(path: str | os.PathLike) -> Path:
    """Fail before any work unless `path` can take a saved stream: an existing file there must
    itself be a saved stream (it is replaced only once the new one is complete)."""
    path = Path(path).absolute()
    if path.is_dir():
        raise StreamFileError(f"{path} is a folder: give a file path to save the stream to")
    if path.exists() and not _is_stream_file(path):
        raise StreamFileError(
            f"{path} exists and is not a saved jaxsink stream: choose another path"
        )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StreamFileError(f"cannot save the stream to {path}: {parent} is not writable")
    return path


def _is_stream_file(path: Path) -> bool:
    try:
        return _read_header(path)[0].get("format") == FORMAT
    except (JaxsinkError, OSError):
        return False


def save_stream(path: str | os.PathLike, saved: SavedStream, model: Model) -> Path:
    """Write `saved` to `path` atomically (a temporary sibling, flushed, then renamed over it):
    a kill at any moment leaves the previous file or the new one, never a mix."""
    from safetensors.numpy import save

    path = check_save_path(path)
    leaves = jax.tree.leaves(saved.row.cache.layers)
    tensors = {f"cache.{i:05d}": np.ascontiguousarray(x) for i, x in enumerate(leaves)}
    tensors["logits"] = np.asarray(saved.row.logits, np.float32)
    tensors["key"] = np.asarray(saved.row.key)
    stream = saved.stream
    state = {
        "model": model_identity(model),
        "stream": {
            "mode": stream.mode,
            "sinks": stream.sinks,
            "window": stream.window,
            "policy": stream.policy,
            "recent": stream.recent,
        },
        "cache_dtype": saved.cache_dtype,
        "stream_index": saved.row.index,
        "pending": saved.pending,
        "settings": saved.settings,
        "decoder": saved.decoder,
        "extra": saved.extra,
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(state),
    }
    data = save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _read_header(path: Path) -> tuple[dict, dict]:
    """(safetensors metadata, tensor headers) of a file, checked against its bytes first."""
    from safetensors import SafetensorError, safe_open

    try:
        headers = check_safetensors(path)
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
    except (CheckpointError, SafetensorError) as e:
        raise StreamFileError(f"{path} is not a saved jaxsink stream: {e}") from None
    return metadata, headers


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """A saved stream's header: what it needs (model identity, layout) and how it was made."""

    stream: StreamConfig
    cache_dtype: str
    index: int
    settings: dict
    model: dict
    state: dict  # the whole JSON header


def read_stream_info(path: str | os.PathLike) -> StreamInfo:
    """The header of a saved stream, read without loading anything else (StreamFileError
    naming the file when it is not a saved stream of this format)."""
    path = Path(path)
    if not path.is_file():
        raise StreamFileError(f"no saved stream at {path}")
    metadata, _ = _read_header(path)
    if metadata.get("format") != FORMAT:
        raise StreamFileError(f"{path} is not a saved jaxsink stream")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise StreamFileError(
            f"{path} has stream format version {metadata.get('format_version')}, this jaxsink "
            f"reads {FORMAT_VERSION}"
        )
    try:
        state = json.loads(metadata["state"])
        s = state["stream"]
        stream = StreamConfig(
            _int(s["sinks"]),
            _int(s["window"]),
            s["mode"],
            s.get("policy", "sink"),  # streams saved before policies kept the ring
            _int(s.get("recent", 0)),
        )
        if state["cache_dtype"] not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {state['cache_dtype']!r}")
        index = _int(state["stream_index"])
        if index < 0:
            raise ValueError(f"stream index {index}")
        _check_parts(state)
        return StreamInfo(
            stream=stream,
            cache_dtype=state["cache_dtype"],
            index=index,
            settings=dict(state.get("settings") or {}),
            model=dict(state["model"]),
            state=state,
        )
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        json.JSONDecodeError,
        ConfigError,
    ) as e:
        raise StreamFileError(f"{path} has a corrupt stream header ({e!r})") from None


# the settings `jaxsink.generate` keeps (`Generation.settings`): all of them; others pass
SETTING_TYPES = settings.saved_types(settings.SETTINGS)


def _int(value) -> int:
    """A JSON integer (not a bool, a float or a string: ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _is_a(value, kind: type) -> bool:
    """Whether a JSON value is a `kind` (an int is a float; a bool is neither; a list holds
    strings)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    if kind is list:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, kind)


def _check_parts(state: dict) -> None:
    """ValueError unless the header's settings, detokenizer state, pending tokens and extra
    have the types that resuming the stream reads (their ranges are checked where used)."""
    settings, decoder = state.get("settings") or {}, state.get("decoder") or {}
    if not all(isinstance(x, dict) for x in (settings, decoder, state.get("extra") or {})):
        raise ValueError("settings, decoder and extra must be JSON objects")
    for name, kind in SETTING_TYPES.items():
        value = settings.get(name)
        if value is not None and not _is_a(value, kind):
            raise ValueError(f"setting {name} = {value!r}")
    ids, read = decoder.get("ids", []), _int(decoder.get("read", 0))
    if not isinstance(ids, list) or not 0 <= read <= len(ids):
        raise ValueError(f"detokenizer state {decoder!r}")
    pending = state.get("pending") or []
    if not isinstance(pending, list):
        raise ValueError(f"pending tokens {pending!r}")
    for i in [*ids, *pending]:
        _int(i)


def load_stream(path: str | os.PathLike, model: Model) -> SavedStream:
    """A saved stream, checked to belong to `model` (config, weights, dtype) and to hold the
    cache its layout implies. StreamFileError naming the file and what differs otherwise."""
    from safetensors import safe_open

    path = Path(path)
    info = read_stream_info(path)
    state, stream, index = info.state, info.stream, info.index
    cache_dtype = CACHE_DTYPES[info.cache_dtype]
    _, headers = _read_header(path)
    _check_model(path, info.model, model_identity(model))
    abstract = jax.eval_shape(lambda: kv.init_cache(model.cfg, stream, 1, cache_dtype))
    want = jax.tree.leaves(abstract.layers)
    names = [f"cache.{i:05d}" for i in range(len(want))]
    expected = {n: list(x.shape) for n, x in zip(names, want, strict=True)}
    expected |= {"logits": [model.cfg.vocab_size]}
    key_like = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    expected |= {"key": list(key_like.shape)}
    got = {n: h.get("shape") for n, h in headers.items()}
    if got != expected:
        raise StreamFileError(
            f"{path} does not hold the cache of a {stream.mode} stream (sinks {stream.sinks}, "
            f"window {stream.window}) of this model: it is corrupt"
        )
    try:
        kv.folded_index(abstract, index)
    except ConfigError as e:
        raise StreamFileError(f"{path}: {e}: it is corrupt") from None
    pending = state.get("pending") or []
    if any(not 0 <= t < model.cfg.vocab_size for t in pending):
        raise StreamFileError(
            f"{path}: its pending tokens {pending} are not all in this vocabulary"
        )
    with safe_open(str(path), "np") as f:
        leaves = [f.get_tensor(n) for n in names]
        logits, key = f.get_tensor("logits"), f.get_tensor("key")
    if any(x.dtype != w.dtype for x, w in zip(leaves, want, strict=True)):
        raise StreamFileError(f"{path}: its cache is not {state['cache_dtype']}: it is corrupt")
    if logits.dtype != np.float32 or key.dtype != key_like.dtype:
        raise StreamFileError(f"{path}: its logits or PRNG key have the wrong dtype: it is corrupt")
    layers = jax.tree.unflatten(jax.tree.structure(abstract.layers), leaves)
    pos, epoch = np.zeros(1, np.int32), np.zeros(1, np.int32)
    one = kv.KVCache(layers=layers, pos=pos, epoch=epoch, stream=stream)
    return SavedStream(
        row=RowState(cache=one, index=index, logits=logits, key=key),
        settings=info.settings,
        decoder=state.get("decoder") or {},
        pending=list(pending),
        extra=state.get("extra") or {},
    )


def _check_model(path: Path, saved: dict, ours: dict) -> None:
    name = saved.get("name") or "another model"
    if saved.get("config_sha256") != ours["config_sha256"] or (
        saved.get("weights_digest") and saved.get("weights_digest") != ours["weights_digest"]
    ):
        raise StreamFileError(
            f"{path} was saved from {name}, not this model ({ours['name']}): resume it with the "
            "model it was saved from"
        )
    if saved.get("dtype") != ours["dtype"]:
        raise StreamFileError(
            f"{path} was saved with --dtype {saved.get('dtype')}, this run uses {ours['dtype']}: "
            f"resume with --dtype {saved.get('dtype')}"
        )
