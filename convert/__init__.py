"""Conversion of Hugging Face models and GGUF files into jaxsink checkpoints.

    from jaxsink.convert import convert
    convert("path/to/hf-folder", "out/model")          # config.json + *.safetensors
    convert("model.Q4_1.gguf", "out/model")            # dequantized to float32
    convert("model.Q4_1.gguf", "out/model", quantize="keep")  # Q8_0/Q4_0/Q4_1 kept as they are
    convert("path/to/hf-folder", "out/model", quantize="int8")  # int8 weights, float32 scales
    convert("HuggingFaceTB/SmolLM2-135M-Instruct", "out/model", dtype="bfloat16")  # hub id

The output is written atomically by `jaxsink.checkpoint.save_checkpoint`. Pickled checkpoints
(`pytorch_model.bin`, `.pt`) are refused, never unpickled. A Hugging Face folder without any
tokenizer converts with a warning on stderr, into a checkpoint for token ids only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from jaxsink.checkpoint import FORMAT, check_writable, save_checkpoint
from jaxsink.config import DTYPES
from jaxsink.quantize import QUANTIZE_KINDS, quantized_config

from .errors import ConvertError
from .families import FAMILIES, read_hf_config
from .gguf import GGUF_TABLE, GGUFSource, config_from_gguf, keep_quantized, read_gguf
from .hf import (
    PICKLE_SUFFIXES,
    SafetensorsSource,
    download,
    looks_like_hub_id,
    malformed_values,
    pickle_refusal,
    weight_files,
)
from .tables import build_params
from .tokenizer import gguf_tokenizer_files, hf_tokenizer_files

__all__ = ["QUANTIZE", "ConvertError", "check_quantize", "convert", "declares_jaxsink"]

# `quantize` values: "keep" keeps a GGUF's Q8_0, Q4_0 and Q4_1 matrices as they are; "int8"
# and "int4" quantize any source's float matrices (`quantize.weight_plan`).
QUANTIZE = ("keep", *QUANTIZE_KINDS)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    announce: str = "",
    quantize: str | None = None,
) -> Path:
    """Convert `src` into a jaxsink checkpoint folder at `out` and return `out`.

    src: a Hugging Face folder (config.json + model.safetensors, or shards + index), a `.gguf`
      file, or a hub id `org/name` (downloaded with huggingface_hub).
    dtype: "float32" or "bfloat16", the stored parameter dtype (GGUF is dequantized first).
    overwrite: replace an existing `out` (only once the new checkpoint is complete).
    progress: show a progress bar on stderr (on a terminal) and `announce`.
    announce: a line printed on stderr once the source has passed its checks (config, file
      headers, tokenizer), just before its tensors are converted: a bad source gives one line,
      its error.
    quantize: None (every weight in `dtype`); "keep": a GGUF's Q8_0, Q4_0 and Q4_1 matrices
      stay quantized as they are (`jaxsink.traced.quant`), its other quantized tensors are dequantized,
      with a line on stderr saying so; "int8" / "int4": any source's matrices are quantized
      (`jaxsink.quantize.weight_plan`), scales in `dtype`.
    Raises ConvertError (unsupported or unsafe input), ConfigError, CheckpointError.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    path = Path(src).expanduser()
    check_quantize(quantize, _is_gguf(path), str(src))
    job = _Job(check_writable(out, overwrite), dtype, overwrite, progress, announce, quantize)
    if path.is_dir():
        return _convert_hf(path, job, str(path.resolve()))
    if _is_gguf(path):
        return _convert_gguf(path, job)
    if path.is_file() and path.name.endswith(PICKLE_SUFFIXES):
        raise pickle_refusal(path)
    if path.exists():
        raise ConvertError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    if looks_like_hub_id(str(src)):
        return _convert_hf(_download(str(src)), job, str(src))
    raise ConvertError(f"model not found: {src}")


@dataclasses.dataclass(frozen=True)
class _Job:
    """Where and how a conversion writes (the arguments of `convert` past `src`)."""

    out: Path
    dtype: str
    overwrite: bool
    progress: bool
    announce: str
    quantize: str | None = None

    def start(self) -> None:
        """The source passed its checks: say so, if asked to."""
        if self.progress and self.announce:
            print(self.announce, file=sys.stderr, flush=True)

    def quantized(self, cfg):
        """`cfg` with the weights `--quantize int8|int4` quantizes (unchanged otherwise)."""
        if self.quantize not in QUANTIZE_KINDS:
            return cfg
        return quantized_config(cfg, self.quantize, self.dtype)

    def save(self, cfg, params, tokenizer_files, label: str) -> Path:
        return save_checkpoint(
            self.out, cfg, params, self.dtype, tokenizer_files, label, self.overwrite
        )


def _download(repo_id: str) -> Path:
    """`download(repo_id)`, with hub failures (no such repo, no network) as ConvertError."""
    try:
        return download(repo_id)
    except Exception as e:  # huggingface_hub raises HTTP, offline and auth errors of many types
        raise ConvertError(
            f"model not found: {repo_id} is no local path and the hub failed: {e}"
        ) from None


def _convert_hf(src: Path, job: _Job, label: str) -> Path:
    """Convert a Hugging Face folder."""
    if declares_jaxsink(src):
        raise ConvertError(f"{src} is already a jaxsink checkpoint")
    cfg = read_hf_config(src)
    files = weight_files(src)
    tokenizer_files = hf_tokenizer_files(src)
    if "tokenizer.json" not in tokenizer_files:
        print(
            f"jaxsink-convert: warning: {label} has no tokenizer; token-id commands work, "
            f"text commands need one: copy tokenizer.json into {job.out}",
            file=sys.stderr,
        )
    family = FAMILIES[cfg.architecture]
    with SafetensorsSource(files) as source:
        cfg = family.widths(cfg, source.shapes())
        table = family.table(cfg)
        cfg = job.quantized(cfg)
        job.start()
        params = build_params(cfg, table, source, job.dtype, job.progress)
    return job.save(cfg, params, tokenizer_files, label)


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def check_quantize(
    quantize: str | None, gguf: bool, src: str, checkpoint: Path | None = None
) -> None:
    """Refuse a `quantize` value that is unknown or does not apply to source `src` (`gguf`:
    whether it is a GGUF file; `checkpoint`: the folder, when `src` is a jaxsink checkpoint,
    which `int8` / `int4` quantize as they load it unless it is quantized already)."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ConvertError(
            f"unknown --quantize {quantize!r} (expected one of {', '.join(QUANTIZE)})"
        )
    if checkpoint is not None and quantize == "keep":
        raise ConvertError(
            f"--quantize keep applies when a .gguf file is converted: {src} is already a "
            "jaxsink checkpoint"
        )
    if checkpoint is not None and _quantized_checkpoint(checkpoint):
        raise ConvertError(
            f"--quantize {quantize}: {src} is already quantized; give its float checkpoint "
            "or its source"
        )
    if quantize == "keep" and not gguf:
        raise ConvertError(
            f"--quantize {quantize} keeps a GGUF file's own quantization: {src} is not a .gguf "
            "file (--quantize int8 or int4 quantizes any model)"
        )


def _quantized_checkpoint(folder: Path) -> bool:
    from jaxsink.checkpoint import read_config

    return read_config(folder)[0].quantized


def _convert_gguf(src: Path, job: _Job) -> Path:
    """Convert a GGUF file (dequantized unless kept, q/k rows restored to the Hugging Face
    order)."""
    meta, reader = read_gguf(src)
    with malformed_values(src):
        cfg = config_from_gguf(meta, [t.name for t in reader.tensors])
        tokenizer_files = gguf_tokenizer_files(meta)
    keep: set[str] = set()
    if job.quantize == "keep":
        cfg, keep, line = keep_quantized(cfg, GGUFSource(reader, cfg))
        if line:
            print(f"jaxsink-convert: {line}", file=sys.stderr, flush=True)
    cfg = job.quantized(cfg)
    job.start()
    source = GGUFSource(reader, cfg, keep)
    params = build_params(cfg, GGUF_TABLE, source, job.dtype, job.progress)
    return job.save(cfg, params, tokenizer_files, str(src.resolve()))


def declares_jaxsink(folder: Path) -> bool:
    """Whether a folder's config.json says it is a jaxsink checkpoint (complete or not)."""
    try:
        return json.loads((folder / "config.json").read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):  # not JSON, not an object
        return False
