"""A safetensors file read tensor by tensor, or row range by row range, with plain reads.

Why not `safetensors.safe_open`: it memory-maps the whole file, so every page it touches stays
in the process's resident set until the file is closed, and loading a model shows up as one more
copy of it. Reading with `os.pread` into fresh buffers keeps the host's own memory at about the
one tensor (or shard of it) being placed. The header is checked before anything is read: its
length, every tensor's dtype x shape against its byte range, every range inside the data and
none overlapping another.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}`,
then the data, offsets relative to its start.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxsink.config import JaxsinkError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class TensorFileError(JaxsinkError):
    """A safetensors file that is not what its header says."""


class TensorFile:
    """An open safetensors file: `names()`, `shape(name)`, `dtype(name)`, `read(name, index)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise TensorFileError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _bad(self, what: str) -> TensorFileError:
        return TensorFileError(
            f"{self.path} is not a valid safetensors file: {what} (re-create or re-download it)"
        )

    def _read_header(self) -> dict:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._bad("shorter than its 8-byte header length")
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if n > min(MAX_HEADER, size - 8):
            raise self._bad(f"its header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._bad("its header is not JSON") from None
        if not isinstance(header, dict):
            raise self._bad("its header is not a JSON object")
        header.pop("__metadata__", None)
        data, entries, ranges = 8 + n, {}, []
        for name, entry in header.items():
            try:
                dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name!r} has a malformed entry") from None
            if any(d < 0 for d in shape) or not 0 <= begin <= end:
                raise self._bad(f"tensor {name!r} has negative dimensions or offsets")
            if math.prod(shape) * dtype.itemsize != end - begin:
                raise self._bad(
                    f"tensor {name!r}: dtype {entry['dtype']} x shape {list(shape)} is "
                    f"{math.prod(shape) * dtype.itemsize} bytes, its data range {end - begin}"
                )
            if data + end > size:
                raise self._bad(f"tensor {name!r}'s data runs past the end of the file")
            entries[name] = (dtype, shape, data + begin)
            ranges.append((begin, end, name))
        ranges.sort()
        for (_, end, a), (begin, _, b) in itertools.pairwise(ranges):
            if begin < end:
                raise self._bad(f"tensors {a!r} and {b!r} overlap")
        return entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """Tensor `name`, or `tensor[index]` for a tuple of slices (one per leading dimension,
        as `jax.make_array_from_callback` gives). A range of the first dimension with the rest
        whole reads only those rows; any other index reads the tensor, then slices it."""
        dtype, shape, offset = self._entries[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = index[0].indices(shape[0]) if shape else None
        rest_whole = all(
            s.indices(d) == (0, d, 1) for s, d in zip(index[1:], shape[1:], strict=True)
        )
        if shape and rest_whole and rows[2] == 1:
            start, stop = rows[0], max(rows[0], rows[1])
            row = math.prod(shape[1:])
            array = self._pread(offset + start * row * dtype.itemsize, (stop - start) * row, dtype)
            return array.reshape((stop - start, *shape[1:]))
        array = self._pread(offset, math.prod(shape), dtype).reshape(shape)
        return array[index] if shape else array

    def _pread(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        out = np.empty(count, dtype)
        view, done = memoryview(out.view(np.uint8)), 0
        while done < out.nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise self._bad("it ends in the middle of a tensor")
            done += got
        return out
