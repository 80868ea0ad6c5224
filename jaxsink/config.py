"""Frozen configuration dataclasses.

Everything here is *static*: these objects are hashable and are passed to `jax.jit` as static
arguments or carried as static pytree metadata. Changing any field recompiles; nothing that
changes while a stream runs (the stream index, the tokens) lives here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

import numpy as np

Mode = Literal["sink", "window", "dense"]
RopeScalingKind = Literal["linear", "llama3"]
NormKind = Literal["rms", "rms_plus_one", "layer"]
ResidualKind = Literal["sequential", "parallel", "parallel_shared"]


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
class Rotary:
    """Rotary positions (RoPE) on the first `dim` features of every query and key head.

    interleaved: False for the Hugging Face "rotate_half" layout (pairs (i, i + dim/2)), True
    for GPT-J's pairs (2i, 2i + 1).
    """

    theta: float
    dim: int
    interleaved: bool = False
    scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.dim < 2 or self.dim % 2:
            raise ConfigError(f"rotary dim must be even and >= 2, got {self.dim}")

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies, float32 [dim // 2], with scaling applied."""
        dim = self.dim
        inv = 1.0 / (self.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        s = self.scaling
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


@dataclasses.dataclass(frozen=True)
class Alibi:
    """ALiBi: every score of query head n gets `-slopes[n] * d(t, k)`, d the streaming
    contract's in-cache distance (the paper's "contiguous linear bias"), added after the query
    scale. One slope per query head, in score units (a model that scales the bias with the
    scores, like Falcon, has its slopes multiplied by the query scale here)."""

    slopes: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalization over the last feature axis.

    kind: `rms` (x / rms(x) * w), `rms_plus_one` (Gemma: x / rms(x) * (1 + w)) or `layer`
    (LayerNorm: (x - mean) / std * w, plus a bias if `bias`).
    """

    kind: NormKind
    eps: float
    bias: bool = False

    def __post_init__(self):
        if self.kind not in typing.get_args(NormKind):
            raise ConfigError(f"unknown norm kind {self.kind!r}")
        if self.bias and self.kind != "layer":
            raise ConfigError("only LayerNorm has a bias")


@dataclasses.dataclass(frozen=True)
class Attention:
    """One layer's self-attention: heads, projections and how positions enter the scores.

    qkv_bias / out_bias: biases on the q, k, v projections / the output projection.
    clip_qkv: q, k and v (biases included) clamped to [-clip_qkv, clip_qkv] (MPT), or None.
    query_scale: the factor of q . k (1 / sqrt(head_dim) in most models).
    qk_norm: a norm of every query and key head over head_dim, one weight row per head, or
      None. position: `Rotary`, `Alibi` or None (no positions: the layer sees an unordered set).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    position: Rotary | Alibi | None
    query_scale: float
    qkv_bias: bool = False
    out_bias: bool = False
    clip_qkv: float | None = None
    qk_norm: Norm | None = None

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if isinstance(self.position, Rotary) and self.position.dim > self.head_dim:
            raise ConfigError(f"rotary dim {self.position.dim} exceeds head_dim {self.head_dim}")
        if isinstance(self.position, Alibi) and len(self.position.slopes) != self.num_heads:
            raise ConfigError(
                f"ALiBi needs one slope per head ({self.num_heads}), got "
                f"{len(self.position.slopes)}"
            )

    @property
    def group(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class Mlp:
    """One layer's MLP: `down(act(gate(x)) * up(x))` if gated, else `down(act(up(x)))`."""

    size: int
    activation: str
    gated: bool = True
    bias: bool = False

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"mlp size must be >= 1, got {self.size}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation {self.activation!r} (supported: {sorted(ACTIVATIONS)})"
            )


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything that makes one decoder layer what it is (layers of one model may differ).

    residual: `sequential` (x += attn(norm(x)); x += mlp(mlp_norm(x))), `parallel`
    (x += attn(norm(x)) + mlp(mlp_norm(x))) or `parallel_shared` (one norm feeds both:
    x += attn(norm(x)) + mlp(norm(x))).
    """

    attention: Attention
    mlp: Mlp
    norm: Norm
    residual: ResidualKind = "sequential"

    def __post_init__(self):
        if self.residual not in typing.get_args(ResidualKind):
            raise ConfigError(f"unknown residual kind {self.residual!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: one `LayerSpec` per layer plus what surrounds the layers.

    The model (`jaxsink.model`), its parameter shapes, the conversion tables and the test
    references all derive from this one description; conversion fills it from a Hugging Face
    config or GGUF metadata.

    embed_scale: the embedding rows are multiplied by it (Gemma: sqrt(hidden_size)).
    logit_scale: the final logits are multiplied by it (muP models).
    lm_head_bias: the output projection has a bias.
    position_limit: in-cache positions from this one on would change the computation in ways
      the streaming contract does not follow (Qwen v1's logn attention and dynamic NTK, which
      act past its `seq_length`): a cache that large is refused. None: no limit.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    final_norm: Norm
    max_position_embeddings: int
    tie_embeddings: bool = False
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    lm_head_bias: bool = False
    position_limit: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.layers:
            raise ConfigError("a model needs at least one layer")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def cache_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one cached token takes over all layers (a key and a value per kv head)."""
        return sum(
            2 * s.attention.num_kv_heads * s.attention.head_dim * itemsize for s in self.layers
        )

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return _from_json(cls, d)


def _to_json(obj):
    """A config dataclass as JSON data; a `Rotary` / `Alibi` / `Norm` value under a field
    typed as a union records its class name under "kind" (`Norm` carries its own)."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Rotary | Alibi):
            out = {"type": type(obj).__name__.lower(), **out}
        return out
    if isinstance(obj, tuple):
        return [_to_json(x) for x in obj]
    return obj


_POSITIONS = {"rotary": Rotary, "alibi": Alibi}


def _from_json(cls, d):
    """The inverse of `_to_json` for config class `cls`; unknown keys are refused by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    d = dict(d)
    d.pop("type", None)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} config keys: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in d.items():
        out[name] = _field_from_json(hints[name], value)
    try:
        return cls(**out)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__} config: {e}") from None


def _field_from_json(hint, value):
    """One field's value from JSON, following its type hint."""
    if value is None:
        return None
    args = typing.get_args(hint)
    if hint is LayerSpec or hint in (Attention, Mlp, Norm, RopeScaling):
        return _from_json(hint, value)
    if Rotary in args:  # the position union
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in _POSITIONS:
            raise ConfigError(f"unknown position kind {kind!r} (expected rotary or alibi)")
        return _from_json(_POSITIONS[kind], value)
    if Norm in args or RopeScaling in args:
        return _from_json(Norm if Norm in args else RopeScaling, value)
    if typing.get_origin(hint) is tuple:
        item = args[0]
        return tuple(_field_from_json(item, v) for v in value)
    return value


ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Which tokens are kept (docs/streaming-contract.md): `sinks` first tokens + a ring of `window` recent ones.

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
        """The cache for `mode` at the same capacity K = sinks + window (the contract's "Modes")."""
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
