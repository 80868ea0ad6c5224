"""Quantization on the host: quantized weights in their host form (`Blocks`, what the converter
reads from GGUF files and writes), int8 / int4 weights made from float ones
(`quantize_blocks`), and which weights `--quantize int8|int4` quantizes (`weight_plan`). The
traced side, a quantized weight in the model and its products, is `jaxsink.traced.quant`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxsink.checkpoint import param_shapes
from jaxsink.config import ConfigError, Quant, quantize_config
from jaxsink.traced.quant import stored_forms

# --- on the host: the converter's and the tests' form ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A quantized weight on the host, in memory form: `codes` [*out, n] int8, `scales` and
    (q4_1) `mins` [*out, n / block] in `spec.scale_dtype`, as `spec` describes."""

    spec: Quant
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def parts(self) -> dict[str, np.ndarray]:
        """Part name -> array (`codes`, `scales`, and `mins` if any)."""
        out = {"codes": self.codes, "scales": self.scales}
        return out | ({"mins": self.mins} if self.mins is not None else {})

    def map(self, transform: Callable, others: list[Blocks], shape: tuple[int, ...]) -> Blocks:
        """A layout transform `transform(*arrays, shape)` applied to every part of `self` and
        `others` (e.g. q, k and v fused): the codes go to `shape`, the scales and minimums to
        `shape` with its last axis counted in blocks."""
        every = [self, *others]
        if any(b.spec != self.spec for b in every):
            raise ValueError("quantized weights of different formats cannot be combined")
        scaled = (*shape[:-1], shape[-1] // self.spec.block)
        fields = {}
        for name in self.parts():
            target = shape if name == "codes" else scaled
            fields[name] = transform(*[b.parts()[name] for b in every], target)
        return Blocks(self.spec, **fields)

    def dequantize(self) -> np.ndarray:
        """The float32 weight: scale * code (+ minimum), in float32 arithmetic (exactly what
        `gguf.quants.dequantize` gives for the same blocks)."""
        block = self.spec.block
        codes = self.codes.reshape(*self.codes.shape[:-1], -1, block).astype(np.float32)
        w = codes * self.scales[..., None].astype(np.float32)
        if self.mins is not None:
            w = w + self.mins[..., None].astype(np.float32)
        return w.reshape(self.codes.shape)

    def stored(self) -> dict[str, np.ndarray]:
        """Part name -> its checkpoint form (`Stored.encode`)."""
        forms = stored_forms(self.spec)
        return {name: forms[name].encode(a) for name, a in self.parts().items()}


# --- int8 / int4 weights made from float ones ------------------------------------------------

# `--quantize int4` quantizes the layers' matrices in groups of this many inputs (llama.cpp's
# Q4_0 block: the same bytes per weight as the kept GGUF, so the two compare like for like).
INT4_GROUP = 32
QUANTIZE_KINDS = ("int8", "int4")


def quantize_blocks(w: np.ndarray, spec: Quant) -> Blocks:
    """A float weight [*out, n] -> its `Blocks` under `spec` (`int8` or `int4`): symmetric
    codes per block of `spec.block` inputs. Qwix (`qwix.quantize`, what MaxText quantizes
    with) calibrates each block's scale in float32 (absmax / 127.5 for int8, / 7.5 for int4);
    the scales are rounded to `spec.scale_dtype` and each code is rounded to nearest against
    its stored scale, so code * stored scale is within half a step of the weight."""
    import qwix

    qtype = {"int8": jnp.int8, "int4": jnp.int4}[spec.kind]
    x = jnp.asarray(w, jnp.float32)
    last = x.ndim - 1
    q = qwix.quantize(x, qtype, channelwise_axes=tuple(range(last)), tiled_axes={last: spec.block})
    scales = np.asarray(q.scale).astype(spec.scale_dtype)  # [*out, n / block]
    step = jnp.asarray(scales.astype(np.float32))
    blocks = x.reshape(*x.shape[:-1], -1, spec.block) / step[..., None]
    low, high = (-128, 127) if spec.bits == 8 else (-8, 7)
    codes = jnp.clip(jnp.round(blocks), low, high).astype(jnp.int8).reshape(x.shape)
    return Blocks(spec, np.asarray(codes), scales)


def weight_plan(cfg, kind: str, dtype: str) -> dict[str, Quant]:
    """Which weights `--quantize kind` (`int8` or `int4`) quantizes, and how: `param_shapes`
    name in float -> `Quant`. int8: every matrix a product or lookup uses (the embedding, the
    LM head, each layer's q/k/v, output, up and down projections), one scale per output
    channel (per channel and head for the output projection, whose last input axis is the head
    dimension); int4: the layers' matrices in groups of `INT4_GROUP` inputs, the embedding and
    LM head in int8 (the LM head is the most quantization-sensitive matrix: llama.cpp's 4-bit
    files keep it at 6 or 8 bits too). Weights a config cannot quantize (expert MLPs, sizes
    that do not fit the group) stay in float. Scales are kept in the model's `dtype`."""
    base = cfg.dequantized()
    plan: dict[str, Quant] = {}
    for name, shape in param_shapes(base).items():
        if kind == "int4" and name not in ("embed", "lm_head"):
            spec = Quant("int4", INT4_GROUP, dtype)
        else:
            spec = Quant("int8", shape[-1], dtype)
        try:
            quantize_config(base, {**plan, name: spec})
        except (ConfigError, KeyError):
            continue
        plan[name] = spec
    return plan


def quantized_config(cfg, kind: str, dtype: str):
    """`cfg` with the weights `--quantize kind` (`int8` or `int4`) quantizes (`weight_plan`)."""
    return quantize_config(cfg, weight_plan(cfg, kind, dtype))
