"""Quantized weights: integer codes with per-block scales (and minimums), dequantized inside the
jitted step right before each matrix product.

A `QuantizedWeight` stands where a float weight `nnx.Param` [*out, *in] would (a `config.Quant`
in the model's config says which): `codes` [*out, *in] int8, `scales` [*out, *in'] float32 with
in' the last input axis divided by the block, and for `q4_1` `mins` of the same shape. Each part
is an `nnx.Param` carrying the float weight's logical axis names (the block axis takes the name
of the input axis it divides), so a mesh splits codes, scales and minimums alike, at block bounds
(`sharding.weight_shardings`).

`product(w, x)` is the one matrix product of the model, for a float weight or a quantized one,
and `take(w, index)` its embedding lookup.

In memory and in the checkpoint (`Stored`): memory holds every code in its own int8 and the
scales in float32, the layout XLA:CPU reads fastest; the checkpoint keeps the format's own
bytes: 4-bit codes two per byte (within each block, byte j holds value j in its low nibble and
value j + block / 2 in its high one: llama.cpp's order) and the scales and minimums in float16.
Loading widens them exactly (`Stored.decode`).

How a quantized product runs (measured on a 2-core EPYC, XLA:CPU; `scripts/quant_bench.py`
writes the figures to `docs/results/quant.json`): XLA:CPU's matrix products are library calls
that take float32 operands (int8 and bfloat16 ones run about 10x slower), so the codes cannot
be unpacked inside the product, and XLA's own loops over a reduction (a fused
dequantize-multiply-sum, or the per-block decomposition sum_b d_b (q_b . x_b) + m_b sum(x_b))
run slower than the library's product of a float weight. So each weight is dequantized into a
float buffer just before its product (one vectorized, multi-threaded loop), whole up to
`DEQUANT_BYTES` of float and in slices along its last output axis beyond, so that the buffer
stays in cache: the step reads the quantized weight from memory, never a float copy of the whole
model. Every part of every slice is made to depend on the product's input: otherwise XLA
schedules all the dequantizations of a step first, or hoists them out of a decode loop, and
the float copies exist at once. A weight with one scale per output row (int8) is only
converted: its scales multiply the product's rows instead (`QuantizedWeight.row_scaled`).

XLA:CPU's YNNPACK fusions (`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise`) take the
conversion into the product for a chunk of 2 or more columns, but not for decode's one column,
and were no faster than the float32 product (measured on the same machine).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink.config import Quant

# The largest float slice of a weight dequantized at once on CPU (bytes): SmolLM2's matrices
# whole (7 MB at most), its LM head (113 MB of float) in 16 slices. The LM head alone, one token:
# 2 / 4 / 8 / 16 MB slices 1.0 / 1.38 / 1.55 / 1.30x float32, dequantized whole 0.21x.
DEQUANT_BYTES = 8 << 20
# A slice of a large weight gathers rows from this many groups (see `QuantizedWeight.slicing`).
SLICE_GROUPS = 16
SCALE_DTYPE = jnp.float32  # scales and minimums in memory (float16 values, exactly)


@dataclasses.dataclass(frozen=True)
class Stored:
    """How one part of a quantized weight is kept in the checkpoint, where that differs from
    memory (the `stored` metadata of its `nnx.Param`).

    dtype: the checkpoint's dtype (numpy name).
    per_byte: values per stored element along the last axis (2: 4-bit codes as nibbles).
    offset: added to a code before it is stored (signed 4-bit codes as offset binary).
    block: values per block along the last axis in memory (codes: the block; scales: 1). A
      shard may split the last axis only at block bounds.
    """

    dtype: str
    per_byte: int = 1
    offset: int = 0
    block: int = 1

    def shape(self, memory_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored shape of an array of `memory_shape`."""
        return (*memory_shape[:-1], memory_shape[-1] // self.per_byte)

    def index(self, index: tuple) -> tuple:
        """The stored index of a memory index (a tuple of slices, as `read_sharded` gives)."""
        if self.per_byte == 1 or len(index) == 0:
            return index
        *lead, last = index
        if not isinstance(last, slice) or last.step not in (None, 1):
            raise ValueError(f"cannot index packed codes by {last!r}")
        scale = self.per_byte
        start = None if last.start is None else last.start // scale
        stop = None if last.stop is None else last.stop // scale
        return (*lead, slice(start, stop))

    def encode(self, a: np.ndarray) -> np.ndarray:
        """Memory form -> checkpoint form."""
        if self.per_byte == 1:
            return np.ascontiguousarray(a.astype(self.dtype))
        *lead, n = a.shape
        half = self.block // 2
        v = (
            (a.astype(np.int16) + self.offset)
            .astype(np.uint8)
            .reshape(*lead, n // self.block, 2, half)
        )
        return np.ascontiguousarray((v[..., 0, :] | (v[..., 1, :] << 4)).reshape(*lead, n // 2))

    def decode(self, a: np.ndarray, dtype) -> np.ndarray:
        """Checkpoint form -> memory form in `dtype` (exact: the values are the same)."""
        if self.per_byte == 1:
            return a.astype(dtype)
        *lead, n = a.shape
        half = self.block // 2
        b = a.reshape(*lead, -1, 1, half)
        nibbles = np.concatenate([b & 0x0F, b >> 4], axis=-2)  # [..., blocks, 2, half]
        codes = nibbles.astype(np.int16) - self.offset
        return codes.reshape(*lead, 2 * n).astype(dtype)


def stored_forms(spec: Quant) -> dict[str, Stored]:
    """The checkpoint form of each part (`codes`, `scales`, `mins`) of a weight quantized by
    `spec`."""
    scale = Stored(spec.scale_dtype)
    codes = Stored("int8", block=spec.block)
    if spec.bits == 4:
        codes = Stored("uint8", 2, 0 if spec.has_minimum else 8, spec.block)
    return {"codes": codes, "scales": scale} | ({"mins": scale} if spec.has_minimum else {})


class QuantizedWeight(nnx.Module):
    """A weight [*out, *in] kept quantized as `spec` says: `codes` [*out, *in] int8 and per
    block of the last input axis `scales` (and `mins`) float32. `names`: the float weight's
    logical axis names (one per dimension)."""

    def __init__(self, spec: Quant, shape: tuple[int, ...], names: tuple[str | None, ...]):
        self.spec = spec
        forms = stored_forms(spec)
        scaled = (*shape[:-1], shape[-1] // spec.block)

        def part(name, shape, dtype):
            return nnx.Param(
                jnp.zeros(shape, dtype),
                out_sharding=names,
                eager_sharding=False,
                stored=forms[name],
            )

        self.codes = part("codes", shape, jnp.int8)
        self.scales = part("scales", scaled, SCALE_DTYPE)
        self.mins = part("mins", scaled, SCALE_DTYPE) if spec.has_minimum else None

    def dequantize(self, dtype, after: jax.Array | None = None, index=...) -> jax.Array:
        """The float weight (or `[index]` of its leading axes) in `dtype`: exactly the values
        the format means (float32 arithmetic, then one rounding to `dtype`). after: an array
        the result must not be computed before (see the module's docstring)."""
        codes, scales = self.codes[index], self.scales[index]
        mins = None if self.mins is None else self.mins[index]
        return _dequantize(codes, scales, mins, self.spec.block, dtype, after)

    def product(self, x: jax.Array, n_in: int, preferred_element_type=None) -> jax.Array:
        """`product(self, x, n_in)`: whole, or, compiled for CPU, a large weight slice by slice
        along its last output axis, in a loop (`slicing`). The platform the step is compiled
        for picks (`jax.lax.platform_dependent`), not the machine: an export for tpu or cuda
        made on a CPU machine carries the whole product, whose kernels read the codes."""
        shape = self.codes.shape
        axis = len(shape) - n_in - 1  # the last output axis: the one sliced
        slices, groups = self.slicing(jnp.dtype(x.dtype).itemsize, axis)
        # One scale per output row factors out of the product: the codes are then only
        # converted (exactly) and the product's rows scaled after it (int8 weights, SmolLM2
        # decode 1.13x the scaled conversion).
        row_scales = self.scales[...] if self.row_scaled(n_in) else None

        def dequantize(codes, scales, mins):
            scales = None if row_scales is not None else scales
            return _dequantize(codes, scales, mins, self.spec.block, x.dtype, x)

        def whole():
            mins = None if self.mins is None else self.mins[...]
            w = dequantize(self.codes[...], self.scales[...], mins)
            return _row_scaled(_contract(w, x, n_in, preferred_element_type), row_scales)

        if slices == 1:
            return whole()
        lead, size = shape[:axis], shape[axis]
        rows = size // (slices * groups)  # consecutive rows of a group

        def grouped(a):  # [*lead, size, ...] -> [*lead, groups, slices, rows, ...]
            return a.reshape(*lead, groups, slices, rows, *a.shape[axis + 1 :])

        def one(parts, i):  # slice i of the product: [*lead, groups * rows, *rest]
            codes, scales, *mins = (
                jax.lax.dynamic_index_in_dim(a, i, axis + 1, keepdims=False).reshape(
                    *lead, groups * rows, *a.shape[axis + 3 :]
                )
                for a in parts
            )
            w = dequantize(codes, scales, mins[0] if mins else None)
            return _contract(w, x, n_in, preferred_element_type)

        def sliced():
            with jax.named_scope("dequantize_sliced_cpu"):
                parts = [
                    grouped(p[...]) for p in (self.codes, self.scales, self.mins) if p is not None
                ]
                ys = jax.lax.map(functools.partial(one, parts), jnp.arange(slices))
                rest = ys.shape[axis + 2 :]  # ys: [slices, *lead, groups * rows, *rest]
                ys = ys.reshape(slices, *lead, groups, rows, *rest)
                ys = jnp.moveaxis(ys, 0, axis + 1)  # [*lead, groups, slices, rows, *rest]
                return _row_scaled(ys.reshape(*lead, size, *rest), row_scales)

        return jax.lax.platform_dependent(cpu=sliced, default=whole)

    def row_scaled(self, n_in: int) -> bool:
        """Whether each output row of a product over the last `n_in` axes has one scale and no
        minimum (per-output-channel int8 over one input axis)."""
        return n_in == 1 and self.mins is None and self.spec.block == self.codes.shape[-1]

    def slicing(self, itemsize: int, axis: int) -> tuple[int, int]:
        """(slices, groups): compiled for CPU, the product dequantizes this weight in the
        fewest equal slices along `axis` whose float form fits `DEQUANT_BYTES` (other
        platforms' products read the codes themselves: `product`). A slice takes `groups` evenly spaced runs of
        consecutive rows, so that a mesh splitting `axis` into up to `SLICE_GROUPS` shards
        finds each slice's rows in its own shards (contiguous slices would make XLA gather
        the whole weight on every device)."""
        shape = self.codes.shape
        size = shape[axis]
        need = min(size, -(-math.prod(shape) * itemsize // DEQUANT_BYTES))
        slices = next(n for n in range(need, size + 1) if size % n == 0)
        return slices, math.gcd(size // slices, SLICE_GROUPS)


def _dequantize(codes, scales, mins, block: int, dtype, after) -> jax.Array:
    """codes [..., n] int8, scales / mins [..., n / block] -> [..., n] in `dtype` (scales None:
    the codes converted, a row-scaled product applies its scales after). after: an
    array whose value the result waits for (every part does: XLA would otherwise hoist a part's
    conversion out of a decode loop, the whole weight at once), or None."""
    if after is not None:
        first = after.reshape(-1)[0]
        zero = jnp.where(jnp.isfinite(first), first, 0) * 0  # a non-finite value never leaks in
        codes = codes + zero.astype(codes.dtype)
        scales = None if scales is None else scales + zero.astype(scales.dtype)
        mins = None if mins is None else mins + zero.astype(mins.dtype)
    if scales is None:
        return codes.astype(dtype)
    blocks = codes.reshape(*codes.shape[:-1], -1, block).astype(jnp.float32)
    w = blocks * scales[..., None].astype(jnp.float32)
    if mins is not None:
        w = w + mins[..., None].astype(jnp.float32)
    return w.reshape(codes.shape).astype(dtype)


def _row_scaled(y: jax.Array, scales: jax.Array | None) -> jax.Array:
    """A product y [*out, *rest] times its rows' scales [*out, 1] (None: y as it is)."""
    if scales is None:
        return y
    out = scales.shape[:-1]
    return y * scales.reshape(*out, *[1] * (y.ndim - len(out))).astype(y.dtype)


def _contract(w: jax.Array, x: jax.Array, n_in: int, preferred_element_type) -> jax.Array:
    """w [*out, *in] (the last n_in axes) times x [*in, *rest] -> [*out, *rest]."""
    lhs = tuple(range(w.ndim - n_in, w.ndim))
    return jax.lax.dot_general(
        w, x, ((lhs, tuple(range(n_in))), ((), ())), preferred_element_type=preferred_element_type
    )


Weight = nnx.Param | QuantizedWeight


def product(w: Weight, x: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """The model's matrix product: a weight [*out, *in] (its last `n_in` axes are the input)
    times feature-major x [*in, *rest] -> [*out, *rest] (in `preferred_element_type`, default
    x's dtype). A float weight is one product; a quantized one is dequantized slice by slice
    into x's dtype, each slice just before its own product."""
    if isinstance(w, QuantizedWeight):
        return w.product(x, n_in, preferred_element_type)
    return _contract(w[...], x, n_in, preferred_element_type)


def take(w: Weight, index: jax.Array, dtype) -> jax.Array:
    """Rows of a weight [V, ...] at integer `index` [...] -> [..., ...] in `dtype` (an
    embedding lookup: a quantized weight dequantizes only the rows it gathers)."""
    if isinstance(w, QuantizedWeight):
        return w.dequantize(dtype, index=index)
    return w[...][index].astype(dtype)
