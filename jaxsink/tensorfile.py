"""A safetensors file read tensor by tensor, or row range by row range, with plain reads.

Why not `safetensors.safe_open`: it memory-maps the whole file, so every page it touches stays
in the process's resident set until the file is closed, and loading a model shows up as one more
copy of it. Reading with `os.pread` into fresh buffers keeps the host's own memory at about the
one tensor (or shard of it) being placed. The header is checked against the file before
anything is read (`files.check_safetensors`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxsink.files import CheckpointError, check_safetensors

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


class TensorFile:
    """An open safetensors file: `names()`, `shape(name)`, `dtype(name)`, `read(name, index)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = check_safetensors(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        data = 8 + int.from_bytes(os.pread(self._fd, 8, 0), "little")
        self._entries = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                self.close()
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {info['dtype']}, "
                                      "which jaxsink does not read")  # fmt: skip
            begin = info["data_offsets"][0]
            self._entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), data + begin)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
                raise CheckpointError(f"{self.path} ends in the middle of tensor data")
            done += got
        return out
