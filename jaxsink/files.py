"""Files jaxsink reads but does not trust: a JSON object and a safetensors file's header, each
checked before use, and `CheckpointError`, what such a file's problems raise. A leaf above the
config layer: the checkpoint, tokenizer, tensor-file and converter readers share it without
importing the model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from jaxsink.config import JaxsinkError


class CheckpointError(JaxsinkError):
    """A checkpoint is missing, incomplete or corrupt."""


def read_json_object(path: Path, error: type[JaxsinkError] = CheckpointError, advice="") -> dict:
    """A JSON object from `path`, or `error` naming the file (and `advice`: what to do)."""
    then = f"; {advice}" if advice else ""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON: {e}{then}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object{then}")
    return data


# Bits per element of every safetensors dtype.
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def check_safetensors(path: str | os.PathLike) -> dict[str, dict]:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets), checked
    against the file's bytes before safetensors maps it: the header fits in the file, every
    tensor's byte count is its dtype times its shape, and the tensors tile the data exactly
    (no overlap, no gap, nothing past the end). Raises CheckpointError naming the file."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is not a valid safetensors file: {why}; download or convert it again"
        )

    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise bad(f"its header length ({length} bytes) runs past the end of the file")
        if length > MAX_HEADER_BYTES:
            raise bad(f"its header length ({length} bytes) exceeds {MAX_HEADER_BYTES}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_bytes = size - 8 - length
    spans = sorted(
        (*_tensor_span(name, info, data_bytes, bad), name)
        for name, info in header.items()
        if name != "__metadata__"
    )
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            where = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise bad(f"tensor {name} {where} (offset {begin}, previous end {end})")
        end = stop
    if end != data_bytes:
        raise bad(f"{data_bytes - end} bytes after the last tensor belong to none")
    return {name: info for name, info in header.items() if name != "__metadata__"}


def _tensor_span(name: str, info, data_bytes: int, bad) -> tuple[int, int]:
    """(begin, end) byte offsets of one header entry in the data, after checking that they lie
    in the data and hold exactly dtype x shape."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        raise bad(f"tensor {name} has no dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_BITS:
        raise bad(f"tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise bad(f"tensor {name} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))):
        raise bad(f"tensor {name} has data_offsets {offsets!r}, not two byte offsets")
    begin, end = offsets
    if not begin <= end <= data_bytes:
        raise bad(f"tensor {name} spans bytes {begin}..{end}, past the {data_bytes} of data")
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    if bits != 8 * (end - begin):
        raise bad(f"tensor {name} is {dtype} {shape} ({bits / 8:g} bytes) in {end - begin} bytes")
    return begin, end
