"""Frozen configuration dataclasses.

Everything here is *static*: these objects are hashable and are passed to `jax.jit` as static
arguments or carried as static pytree metadata. Changing any field recompiles; nothing that
changes while a stream runs (the stream index, the tokens) lives here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

Mode = Literal["sink", "window", "dense"]
RopeScalingKind = Literal["linear", "llama3"]


class JaxsinkError(ValueError):
    """A problem with the user's input: the CLIs print its message and exit with status 2."""


class ConfigError(JaxsinkError):
    """A configuration value is missing, out of range or not supported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (the `rope_scaling` / `rope_parameters` of Hugging Face configs).

    `linear` divides every frequency by `factor`; `llama3` is Llama 3.1's band-wise rescaling.
    """

    kind: RopeScalingKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer, shared by every architecture.

    One generic block is configured by these flags (see `jaxsink.model`); conversion fills them
    from a Hugging Face config or GGUF metadata.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    rotary_dim: int | None = None  # None: the whole head_dim is rotated
    rotary_interleaved: bool = False  # False: HF "rotate_half" layout; True: GPT-J pairs
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.rotary_dim is not None and (
            self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim
        ):
            raise ConfigError(
                f"rotary_dim must be even and in (0, head_dim], got {self.rotary_dim}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r} (supported: {sorted(ACTIVATIONS)})"
            )

    @property
    def rotated_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies, float32 [rotated_dim // 2], with scaling applied."""
        dim = self.rotated_dim
        inv = 1.0 / (
            self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
        )
        inv = inv.astype(np.float32)
        s = self.rope_scaling
        if s is None:
            return inv
        if s.kind == "linear":
            return (inv / np.float32(s.factor)).astype(np.float32)
        # llama3: long wavelengths scaled by `factor`, short kept, a smooth band in between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Which tokens are kept (SPEC.md): `sinks` first tokens + a ring of `window` recent ones.

    Modes: `sink` (S, W as given), `window` (S = 0, W = sinks + window: same capacity K),
    `dense` (no eviction: capacity `window` = the whole stream, S = 0).
    Use `StreamConfig.for_mode` to build one from user flags.
    """

    sinks: int
    window: int
    mode: Mode = "sink"

    def __post_init__(self):
        if self.mode not in ("sink", "window", "dense"):
            raise ConfigError(f"unknown mode {self.mode!r} (expected sink, window or dense)")
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.mode != "sink" and self.sinks:
            raise ConfigError(f"{self.mode} mode keeps no sinks (got sinks={self.sinks})")

    @property
    def capacity(self) -> int:
        """K = S + W: cache slots kept between steps."""
        return self.sinks + self.window

    @property
    def wraps(self) -> bool:
        """Whether the ring can wrap (evict). Dense mode never does."""
        return self.mode != "dense"

    @classmethod
    def for_mode(
        cls, mode: Mode, sinks: int = 4, window: int = 1020, dense_capacity: int | None = None
    ) -> StreamConfig:
        """The cache for `mode` at the same capacity K = sinks + window (SPEC "Modes")."""
        if sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if mode == "sink":
            return cls(sinks, window, "sink")
        if mode == "window":
            return cls(0, sinks + window, "window")
        if mode == "dense":
            if dense_capacity is None or dense_capacity < 1:
                raise ConfigError("dense mode needs the stream length as its capacity")
            return cls(0, dense_capacity, "dense")
        raise ConfigError(f"unknown mode {mode!r} (expected sink, window or dense)")
