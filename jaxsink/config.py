"""Frozen configuration dataclasses.

Everything here is *static*: these objects are hashable and are passed to `jax.jit` as static
arguments or carried as static pytree metadata. Changing any field recompiles; nothing that
changes while a stream runs (the stream index, the tokens) lives here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Literal

import ml_dtypes
import numpy as np

Mode = Literal["sink", "window", "dense"]
RopeScalingKind = Literal["linear", "llama3", "yarn", "longrope"]
NormKind = Literal["rms", "rms_plus_one", "layer"]
ResidualKind = Literal["sequential", "parallel", "parallel_shared"]
NormPlacement = Literal["pre", "post", "pre_post"]
QkNormScope = Literal["head", "all"]
QuantKind = Literal["q8_0", "q4_0", "q4_1", "int8", "int4"]
ScaleDtype = Literal["float16", "float32", "bfloat16"]


# Hard limits on the sizes a config may state, far above any published model (Llama 3.1 405B:
# 126 layers, hidden 16384, 128 heads; Gemma 3: a vocabulary of 262144): a hostile config is
# refused before any shape is built from it, instead of describing a million layers or
# allocating a terabyte vocabulary.
MAX_VOCAB = 1 << 23
MAX_HIDDEN = 1 << 17
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_MLP = 1 << 20
MAX_EXPERTS = 4096


# The weights' dtypes by name, and the KV cache's: the weights' and int8 (int8 ring keys and
# values with per-token, per-head scales, exact float32 sinks: `jaxsink.traced.cache.Int8Block`).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CACHE_DTYPES = {**DTYPES, "int8": np.dtype(np.int8)}


class JaxsinkError(ValueError):
    """A problem with the user's input: the CLIs print its message and exit with status 2."""


def one_line(error: Exception) -> str:
    """An error's message on one line (an OSError's with the file it names)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror}"
    else:
        text = str(error)
    return " ".join(text.split())


class ConfigError(JaxsinkError):
    """A configuration value is missing, out of range or not supported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (the `rope_scaling` / `rope_parameters` of Hugging Face configs).

    - `linear` divides every frequency by `factor`.
    - `llama3` is Llama 3.1's band-wise rescaling (`low_freq_factor`, `high_freq_factor`).
    - `yarn` (gpt-oss) blends each frequency with itself divided by `factor` along a ramp set by
      `beta_fast` / `beta_slow`, and scales cos and sin by `attention_factor`.
    - `longrope` (Phi-3) divides the frequencies by `short_factor`, or by `long_factor` when the
      positions reach past `original_max_position_embeddings`, and scales cos and sin by
      `attention_factor`. Hugging Face switches per forward call, by the largest position of the
      call; a stream's positions are in-cache positions, so jaxsink decides once per cache: long
      factors iff its largest in-cache position reaches `original_max_position_embeddings`.

    attention_factor: None for the family's default (yarn: 0.1 ln(factor) + 1, or the ratio
      of the `mscale` / `mscale_all_dim` forms; longrope: sqrt(1 + ln(factor) / ln(original
      max)); 1 for the others).
    """

    kind: RopeScalingKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in typing.get_args(RopeScalingKind):
            raise ConfigError(f"unknown rope scaling {self.kind!r}")
        if self.kind == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ConfigError("longrope scaling needs short_factor and long_factor")

    def cos_sin_scale(self) -> float:
        """The factor cos and sin are multiplied by (Hugging Face's `attention_scaling`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.kind == "yarn":

            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if self.mscale and self.mscale_all_dim:
                return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
            return mscale(self.factor)
        if self.kind == "longrope" and self.factor > 1:
            original = self.original_max_position_embeddings
            return math.sqrt(1 + math.log(self.factor) / math.log(original))
        return 1.0


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

    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by: 1 unless the scaling says otherwise."""
        return 1.0 if self.scaling is None else self.scaling.cos_sin_scale()

    def inv_freq(self, n_positions: int = 0) -> np.ndarray:
        """Rotary inverse frequencies, float32 [dim // 2], with scaling applied, for positions
        below `n_positions` (which only longrope's choice of factors depends on)."""
        dim = self.dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        inv = (1.0 / (self.theta**exponents)).astype(np.float32)
        s = self.scaling
        if s is None:
            return inv
        if s.kind == "linear":
            return (inv / np.float32(s.factor)).astype(np.float32)
        if s.kind == "longrope":
            long = n_positions > s.original_max_position_embeddings
            ext = np.asarray(s.long_factor if long else s.short_factor, np.float32)
            if ext.shape != inv.shape:
                raise ConfigError(f"longrope factors must have {dim // 2} entries, got {ext.size}")
            return (1.0 / (ext * (self.theta**exponents).astype(np.float32))).astype(np.float32)
        if s.kind == "yarn":
            return _yarn_inv_freq(self.theta, dim, s)
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


def _yarn_inv_freq(theta: float, dim: int, s: RopeScaling) -> np.ndarray:
    """YaRN's blend of extrapolated and interpolated frequencies, as Hugging Face computes it
    (float32 arithmetic on the frequencies, float64 on the ramp's bounds)."""
    pos_freqs = (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)).astype(
        np.float32
    )
    original = s.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extrapolated = (1.0 / pos_freqs).astype(np.float32)
    inv_interpolated = (1.0 / (np.float32(s.factor) * pos_freqs)).astype(np.float32)
    inv = inv_interpolated * (1 - extrapolation) + inv_extrapolated * extrapolation
    return inv.astype(np.float32)


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
    qk_norm: a norm of the queries and keys (before positions), one weight row per head, or
      None; qk_norm_scope `head`: each head normalized over head_dim (Qwen3, Gemma 3, StableLM),
      `all`: all heads of the projection together (OLMo 2).
    position: `Rotary`, `Alibi` or None (no positions: the layer sees an unordered set).
    sliding_window: None for a full layer (the streaming contract's sinks + window), or w for a
      native sliding-window layer: the query sees its own key and the w - 1 before it, at their
      true distances, and no sinks (Hugging Face's `sliding_window`).
    softcap: scores capped as `softcap * tanh(score / softcap)` before the mask (Gemma 2), or
      None.
    learned_sinks: one learned logit per query head joins every softmax's denominator with a
      value of zero (gpt-oss's `sinks`).
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
    qk_norm_scope: QkNormScope = "head"
    sliding_window: int | None = None
    softcap: float | None = None
    learned_sinks: bool = False

    def __post_init__(self):
        if self.qk_norm_scope not in typing.get_args(QkNormScope):
            raise ConfigError(f"unknown qk-norm scope {self.qk_norm_scope!r}")
        if self.sliding_window is not None and self.sliding_window < 2:
            raise ConfigError(f"sliding_window must be >= 2, got {self.sliding_window}")
        if self.softcap is not None and self.softcap <= 0:
            raise ConfigError(f"attention softcap must be > 0, got {self.softcap}")
        _check_size("num_heads", self.num_heads, MAX_HEADS)
        _check_size("num_kv_heads", self.num_kv_heads, MAX_HEADS)
        _check_size("head_dim", self.head_dim, MAX_HEAD_DIM)
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
class Experts:
    """A mixture of experts: `num` expert MLPs, each token routed to `top_k` of them.

    The router's logits (`router(x)`, plus a bias if `router_bias`) give every expert a
    probability by softmax; a token's output is the sum of its top-k experts' outputs weighted by
    their probabilities, renormalized to sum to one if `normalize` (Mixtral, gpt-oss: the same as
    a softmax over the top-k logits), as they are otherwise (Qwen3-MoE without norm_topk_prob).
    """

    num: int
    top_k: int
    normalize: bool = True
    router_bias: bool = False

    def __post_init__(self):
        _check_size("number of experts", self.num, MAX_EXPERTS)
        if not 1 <= self.top_k <= self.num:
            raise ConfigError(f"experts: need 1 <= top_k <= num, got {self.top_k} of {self.num}")


@dataclasses.dataclass(frozen=True)
class Mlp:
    """One layer's MLP: `down(act(gate(x)) * up(x))` if gated, else `down(act(up(x)))`.

    activation `clamped_swiglu` (gpt-oss, gated only): gate clamped above at `limit`, up to
    [-limit, limit], then `gate * sigmoid(alpha * gate) * (up + 1)`.
    experts: None for one dense MLP, else a mixture of `experts.num` MLPs of this shape.
    """

    size: int
    activation: str
    gated: bool = True
    bias: bool = False
    experts: Experts | None = None
    alpha: float = 1.0
    limit: float | None = None

    def __post_init__(self):
        _check_size("mlp size", self.size, MAX_MLP)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation {self.activation!r} (supported: {sorted(ACTIVATIONS)})"
            )
        if self.activation == "clamped_swiglu" and (not self.gated or self.limit is None):
            raise ConfigError("clamped_swiglu needs a gated MLP and a limit")


# Fields that JSON leaves out while they hold their default, so that a float model's
# config.json reads as it did before quantized weights existed.
_OMIT_DEFAULT = {"omit_default": True}


@dataclasses.dataclass(frozen=True)
class Quant:
    """A weight kept quantized (`jaxsink.traced.quant`): integer codes along its input (last) axis, in
    blocks of `block` values that share a scale, and for `q4_1` a minimum:

    - `q8_0`: w = scale * code, codes in [-127, 127] (llama.cpp's Q8_0);
    - `q4_0`: w = scale * code, codes in [-8, 7] (Q4_0);
    - `q4_1`: w = scale * code + minimum, codes in [0, 15] (Q4_1);
    - `int8`: w = scale * code, codes in [-128, 127], one block per output channel (the whole
      last input axis): `--quantize int8`;
    - `int4`: w = scale * code, codes in [-8, 7], groups of `block` inputs: `--quantize int4`.

    The GGUF kinds are a file's blocks as they are; `int8` and `int4` are made from float
    weights by Qwix (`jaxsink.quantize.quantize_blocks`). Either way the values are exactly what
    the codes and scales mean, and a product dequantizes them inside the jitted step.
    scale_dtype: the scales' (and minimums') dtype in the checkpoint: float16 for GGUF blocks,
    the model's dtype for `int8` / `int4`.
    """

    kind: QuantKind
    block: int = 32
    scale_dtype: ScaleDtype = dataclasses.field(default="float16", metadata=_OMIT_DEFAULT)

    def __post_init__(self):
        if self.kind not in typing.get_args(QuantKind):
            raise ConfigError(
                f"unknown weight quantization {self.kind!r} "
                f"(expected one of {', '.join(typing.get_args(QuantKind))})"
            )
        if self.scale_dtype not in typing.get_args(ScaleDtype):
            raise ConfigError(
                f"unknown quantization scale dtype {self.scale_dtype!r} "
                f"(expected one of {', '.join(typing.get_args(ScaleDtype))})"
            )
        _check_size("quantization block", self.block, MAX_HIDDEN)
        if self.bits == 4 and self.block % 2:
            raise ConfigError(f"4-bit blocks hold an even number of values, got {self.block}")

    @property
    def bits(self) -> int:
        """Bits per code: 8 or 4."""
        return 8 if self.kind in ("q8_0", "int8") else 4

    @property
    def has_minimum(self) -> bool:
        return self.kind == "q4_1"


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """Which of a layer's matrices are kept quantized (None: a float weight): the fused q/k/v
    projection, the output projection, the MLP's up (gate and up) and down projections."""

    qkv: Quant | None = None
    out: Quant | None = None
    up: Quant | None = None
    down: Quant | None = None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything that makes one decoder layer what it is (layers of one model may differ).

    residual: `sequential` (x += attn(norm(x)); x += mlp(mlp_norm(x))), `parallel`
    (x += attn(norm(x)) + mlp(mlp_norm(x))) or `parallel_shared` (one norm feeds both:
    x += attn(norm(x)) + mlp(norm(x))).
    norms (sequential only): where the norms sit around each residual branch: `pre` (as above),
    `post` (x += post_attn_norm(attn(x)); x += post_mlp_norm(mlp(x)): OLMo 2) or `pre_post`
    (both: x += post_attn_norm(attn(norm(x))), then the same for the MLP: Gemma 2 and 3).
    """

    attention: Attention
    mlp: Mlp
    norm: Norm
    residual: ResidualKind = "sequential"
    norms: NormPlacement = "pre"
    quant: LayerQuant = dataclasses.field(default=LayerQuant(), metadata=_OMIT_DEFAULT)

    def __post_init__(self):
        if self.residual not in typing.get_args(ResidualKind):
            raise ConfigError(f"unknown residual kind {self.residual!r}")
        if self.norms not in typing.get_args(NormPlacement):
            raise ConfigError(f"unknown norm placement {self.norms!r}")
        if self.norms != "pre" and self.residual != "sequential":
            raise ConfigError(f"{self.norms} norms need a sequential residual")
        q, a = self.quant, self.attention
        if self.mlp.experts is not None and (q.up or q.down):
            raise ConfigError("quantized expert weights are not supported")
        for what, quant, size in (("out", q.out, a.head_dim), ("down", q.down, self.mlp.size)):
            if quant is not None and size % quant.block:
                raise ConfigError(
                    f"a quantized {what} projection needs its input size ({size}) to be a "
                    f"multiple of its block ({quant.block})"
                )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: one `LayerSpec` per layer plus what surrounds the layers.

    The model (`jaxsink.traced`), its parameter shapes, the conversion tables and the test
    references all derive from this one description; conversion fills it from a Hugging Face
    config or GGUF metadata.

    embed_scale: the embedding rows are multiplied by it (Gemma: sqrt(hidden_size)).
    embed_norm: a norm of the embeddings before the first layer (Bloom), or None.
    logit_scale: the final logits are multiplied by it (muP models).
    final_softcap: the final logits capped as `final_softcap * tanh(logit / final_softcap)`
      after `logit_scale` (Gemma 2), or None.
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
    embed_norm: Norm | None = None
    logit_scale: float = 1.0
    final_softcap: float | None = None
    lm_head_bias: bool = False
    position_limit: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    embed_quant: Quant | None = dataclasses.field(default=None, metadata=_OMIT_DEFAULT)
    lm_head_quant: Quant | None = dataclasses.field(default=None, metadata=_OMIT_DEFAULT)

    def __post_init__(self):
        _check_size("vocab_size", self.vocab_size, MAX_VOCAB)
        _check_size("hidden_size", self.hidden_size, MAX_HIDDEN)
        _check_size("number of layers", len(self.layers), MAX_LAYERS)
        if self.lm_head_quant is not None and self.tie_embeddings:
            raise ConfigError("tied embeddings have no lm_head to quantize (quantize embed)")
        hidden = [self.embed_quant, self.lm_head_quant]
        hidden += [q for s in self.layers for q in (s.quant.qkv, s.quant.up)]
        for quant in hidden:
            if quant is not None and self.hidden_size % quant.block:
                raise ConfigError(
                    f"quantized weights over the hidden size ({self.hidden_size}) need it to "
                    f"be a multiple of their block ({quant.block})"
                )

    @property
    def quantized(self) -> bool:
        """Whether any weight is kept quantized."""
        layers = any(s.quant != LayerQuant() for s in self.layers)
        return layers or self.embed_quant is not None or self.lm_head_quant is not None

    def dequantized(self) -> ModelConfig:
        """The same model with every weight in float (what a float conversion describes)."""
        layers = tuple(dataclasses.replace(s, quant=LayerQuant()) for s in self.layers)
        return dataclasses.replace(self, layers=layers, embed_quant=None, lm_head_quant=None)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def cache_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one cached token takes over the full layers (a key and a value per kv head):
        what a dense cache grows by per token (native sliding layers keep their own window)."""
        return sum(
            2 * s.attention.num_kv_heads * s.attention.head_dim * itemsize
            for s in self.layers
            if s.attention.sliding_window is None
        )

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return _from_json(cls, d)


def _check_size(name: str, value: int, limit: int) -> None:
    """Refuse a size outside [1, limit] (or not an integer) by name."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= limit:
        raise ConfigError(f"{name} must be in [1, {limit}], got {value}")


def _to_json(obj):
    """A config dataclass as JSON data; a `Rotary` / `Alibi` / `Norm` value under a field
    typed as a union records its class name under "kind" (`Norm` carries its own)."""
    if dataclasses.is_dataclass(obj):
        out = {
            f.name: _to_json(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)
        }
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
    if cls is ModelConfig and isinstance(d.get("layers"), list):
        _check_size("number of layers", len(d["layers"]), MAX_LAYERS)
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in d.items():
        try:
            out[name] = _field_from_json(hints[name], value)
        except ConfigError as e:
            raise ConfigError(f"{cls.__name__}.{name}: {e}") from None
    try:
        return cls(**out)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__} config: {e}") from None


def _field_from_json(hint, value):
    """One field's value from JSON, following its type hint."""
    if value is None:
        return None
    args = typing.get_args(hint)
    if hint is LayerSpec or hint in (Attention, Mlp, Norm, RopeScaling, LayerQuant):
        return _from_json(hint, value)
    if Experts in args:
        return _from_json(Experts, value)
    if Quant in args:
        return _from_json(Quant, value)
    if Rotary in args:  # the position union
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in _POSITIONS:
            raise ConfigError(f"unknown position kind {kind!r} (expected rotary or alibi)")
        return _from_json(_POSITIONS[kind], value)
    if Norm in args or RopeScaling in args:
        return _from_json(Norm if Norm in args else RopeScaling, value)
    tuples = [a for a in (hint, *args) if typing.get_origin(a) is tuple]
    if tuples:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}")
        item = typing.get_args(tuples[0])[0]
        return tuple(_field_from_json(item, v) for v in value)
    return _check_scalar(hint, value)


def _check_scalar(hint, value):
    """`value` if its JSON type fits a scalar field (an int where a float goes, never a bool
    or a float where an int goes), else ConfigError."""
    kinds = [t for t in (hint, *typing.get_args(hint)) if t in (bool, int, float, str)]
    if not kinds or type(value) in kinds or (type(value) is int and float in kinds):
        return value
    raise ConfigError(f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


POLICIES = ("sink", "tova", "h2o")
Policy = Literal["sink", "tova", "h2o"]

ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "clamped_swiglu")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Which tokens are kept (docs/streaming-contract.md): `sinks` first tokens + `window` more.

    Modes: `sink` (S, W as given), `window` (S = 0, W = sinks + window: same capacity K),
    `dense` (no eviction: capacity `window` = the whole stream, S = 0).
    Policies (sink mode only) say which W tokens besides the sinks stay: `sink`, the W most
    recent (a ring); `tova`, the ones the current query attends to most (the least attended
    one is evicted); `h2o`, the `recent` most recent and, among the older, the ones with the
    largest attention received so far (`jaxsink.traced.policy`).
    Use `StreamConfig.for_mode` to build one from user flags.
    """

    sinks: int
    window: int
    mode: Mode = "sink"
    policy: Policy = "sink"
    recent: int = 0

    def __post_init__(self):
        if self.mode not in ("sink", "window", "dense"):
            raise ConfigError(f"unknown mode {self.mode!r} (expected sink, window or dense)")
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.mode != "sink" and self.sinks:
            raise ConfigError(f"{self.mode} mode keeps no sinks (got sinks={self.sinks})")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r} (expected {', '.join(POLICIES)})")
        if self.policy != "sink" and self.mode != "sink":
            raise ConfigError(
                f"--policy {self.policy} evicts from the sink cache: use it with --mode sink, "
                f"not {self.mode}"
            )
        if self.policy == "h2o" and not 1 <= self.recent < self.window:
            raise ConfigError(
                f"--recent must be in [1, window - 1] = [1, {self.window - 1}], got {self.recent}"
            )
        if self.policy != "h2o" and self.recent:
            raise ConfigError(f"--recent is h2o's recent window; --policy {self.policy} has none")

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
        cls,
        mode: Mode,
        sinks: int = 4,
        window: int = 1020,
        dense_capacity: int | None = None,
        policy: Policy = "sink",
        recent: int | None = None,
    ) -> StreamConfig:
        """The cache for `mode` at the same capacity K = sinks + window (the contract's
        "Modes"), keeping its tokens by `policy`; recent: h2o's recent window (None: half the
        window)."""
        if sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if policy != "sink" and mode != "sink":
            raise ConfigError(
                f"--policy {policy} evicts from the sink cache: use it with --mode sink, not {mode}"
            )
        if mode == "sink":
            if policy == "h2o" and recent is None:
                recent = max(1, window // 2)
            return cls(sinks, window, "sink", policy, recent or 0)
        if mode == "window":
            return cls(0, sinks + window, "window")
        if mode == "dense":
            if dense_capacity is None or dense_capacity < 1:
                raise ConfigError("dense mode needs the stream length as its capacity")
            return cls(0, dense_capacity, "dense")
        raise ConfigError(f"unknown mode {mode!r} (expected sink, window or dense)")


# --- which weights a config keeps quantized ---------------------------------------------------


# The weights a config may keep quantized (`config.Quant`): the layer weights' names after
# `layers.{i}.` and the `config.LayerQuant` field that says so; `embed` and `lm_head` have
# their own `ModelConfig` fields.
QUANTIZABLE = {"attn.qkv": "qkv", "attn.out": "out", "mlp.up": "up", "mlp.down": "down"}


def quantize_config(cfg: ModelConfig, weights: Mapping[str, Quant]) -> ModelConfig:
    """`cfg` with each weight named in `weights` (its `param_shapes` name in float: `embed`,
    `lm_head`, `layers.3.mlp.up`, ...) kept quantized as given. KeyError for a weight that
    cannot be quantized; ConfigError (from the config) for sizes that do not fit the blocks."""
    model, layers = {}, [dict() for _ in cfg.layers]
    for name, spec in weights.items():
        head, _, rest = name.partition(".")
        if name in ("embed", "lm_head"):
            model[f"{name}_quant"] = spec
        elif head == "layers" and rest.partition(".")[2] in QUANTIZABLE:
            i, _, weight = rest.partition(".")
            layers[int(i)][QUANTIZABLE[weight]] = spec
        else:
            raise KeyError(f"{name} cannot be kept quantized")
    specs = tuple(
        dataclasses.replace(s, quant=dataclasses.replace(s.quant, **q)) if q else s
        for s, q in zip(cfg.layers, layers, strict=True)
    )
    return dataclasses.replace(cfg, layers=specs, **model)


def quantized_weights(cfg: ModelConfig) -> dict[str, Quant]:
    """The weights `cfg` keeps quantized: `param_shapes` name in float -> its `config.Quant`
    (the inverse of `quantize_config`)."""
    out = {name: q for name, q in (("embed", cfg.embed_quant), ("lm_head", cfg.lm_head_quant))}
    for i, spec in enumerate(cfg.layers):
        for weight, field in QUANTIZABLE.items():
            out[f"layers.{i}.{weight}"] = getattr(spec.quant, field)
    return {name: q for name, q in out.items() if q is not None}
