"""What the family modules share: the `Family` entry, the layout transforms and the table of
Llama's names several families use, and the pieces of a config reader (rotary, heads, windows,
experts, the `ModelConfig`).

Family modules import this module (and `tables`, `hf`), never one another nor the registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from ..errors import ConvertError
from ..hf import ConfigReader, RopeSpec, layer_windows, read_rope
from ..tables import LLAMA, Table, fuse_qkv, layer_rules, outer


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` converts.

    required: keys without which the config means nothing; defaults: transformers' values for
    keys a config.json may omit (its config class fills them the same way); read: the reader;
    table: the tensor names of a config of this family; widths: the config with the widths
    only the tensors tell truthfully read from their shapes (name -> shape), where the
    family's reference codes disagree with its config.
    """

    required: tuple[str, ...]
    defaults: dict[str, Any]
    read: Callable[[str, ConfigReader], ModelConfig]
    table: Callable[[ModelConfig], Table]
    widths: Callable[[ModelConfig, Mapping[str, tuple[int, ...]]], ModelConfig] = (
        lambda cfg, shapes: cfg
    )


def constant(table: Table) -> Callable[[ModelConfig], Table]:
    """The `Family.table` of a family whose names do not depend on its config."""
    return lambda cfg: table


REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
LLAMA_REQUIRED = (*REQUIRED, "intermediate_size")
GPT2_REQUIRED = ("vocab_size", "n_embd", "n_layer", "n_head")  # GPT-2's names (GPT-J, BTLM)
# transformers' defaults shared by the families added since Llama (each overrides its own)
MODERN = {
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
}
# Mixture keys that only shape training.
ROUTER_TRAINING = ("router_aux_loss_coef", "output_router_logits", "router_jitter_noise")


# --- layout transforms beyond the generic ones (`tables`) -----------------------------------


def fuse_thirds(w: np.ndarray, shape) -> np.ndarray:
    """One [3 * N * H, ...] projection whose output thirds are q, k, v (MPT, Qwen v1) -> the
    fused per-kv-head layout [N, 3, H, ...]."""
    q, k, v = np.split(w, 3, axis=0)
    return fuse_qkv(q, k, v, shape)


def tile_heads(w: np.ndarray, shape) -> np.ndarray:
    """One qk-norm row [H] shared by every head -> one row per head [N, H]."""
    return np.broadcast_to(w, shape).copy()


def llama_table(layer: dict, final_norm: str = "model.norm") -> Table:
    """The table of a family saved under Llama's names: `model.embed_tokens`, `final_norm` and
    `lm_head` outside the layers, `layer` (target suffix -> (source suffixes, transform)) under
    `model.layers.{i}`, with Llama's skipped buffers and tied copy."""
    return Table(
        rules=(*outer("model.embed_tokens", final_norm), *layer_rules("model.layers.{i}", layer)),
        ignored_suffixes=LLAMA.ignored_suffixes,
        tied_copy=LLAMA.tied_copy,
    )


# --- pieces of a reader ---------------------------------------------------------------------


def head_rotary(rope: RopeSpec, head_dim: int, partial: float | None, interleaved=False) -> Rotary:
    """The rotary of a head: the config's fraction of it, as transformers rounds it."""
    fraction = rope.partial if rope.partial is not None else partial
    dim = head_dim if fraction is None else int(head_dim * fraction)
    if dim % 2:
        raise ConvertError(f"rotary dim {dim} (head_dim {head_dim} x {fraction}) is odd")
    return Rotary(rope.theta, dim, interleaved, rope.scaling)


def full_rotary(rope: RopeSpec, head_dim: int) -> Rotary:
    """Rotary over the whole head, for families whose code ignores `partial_rotary_factor`."""
    return Rotary(rope.theta, head_dim, False, rope.scaling)


def rotated_fraction(r: ConfigReader, rope: RopeSpec, legacy_key: str, default: float) -> float:
    """The rotated fraction: `rope_parameters.partial_rotary_factor` (5.x) or a 4.x top-level
    key; they must agree if both are given."""
    legacy = r.d.pop(legacy_key, None)
    if legacy is not None and rope.partial is not None and float(legacy) != rope.partial:
        raise ConvertError(f"{legacy_key} {legacy} disagrees with rope_parameters")
    if rope.partial is not None:
        return rope.partial
    return default if legacy is None else float(legacy)


def phi_attention(
    r: ConfigReader, hidden: int, default_fraction: float, qk_norm_bias: bool, **biases
) -> tuple[Attention, float]:
    """Phi's attention, which StableLM keeps, and the eps of their LayerNorms (`layer_norm_eps`):
    `num_attention_heads` heads of hidden / heads, `num_key_value_heads`, a rotary over
    `partial_rotary_factor` of each head (`default_fraction` if the config gives none), the
    projections' `biases` (`qkv_bias`, `out_bias`) and, with `qk_layernorm`, a LayerNorm of
    queries and keys (biased if `qk_norm_bias`)."""
    num_heads = r.take("num_attention_heads")
    head_dim = hidden // num_heads
    rope = read_rope(r.d, r.defaults["rope_theta"])
    partial = rotated_fraction(r, rope, "partial_rotary_factor", default_fraction)
    eps = float(r.take("layer_norm_eps"))
    attention = Attention(
        num_heads,
        r.take("num_key_value_heads") or num_heads,
        head_dim,
        head_rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qk_norm=Norm("layer", eps, bias=qk_norm_bias) if r.take("qk_layernorm") else None,
        **biases,
    )
    return attention, eps


def read_heads(r: ConfigReader, hidden: int) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a Llama-style config."""
    num_heads = r.take("num_attention_heads")
    head_dim = r.take("head_dim") or hidden // num_heads
    return num_heads, r.take("num_key_value_heads") or num_heads, head_dim


def num_experts(r: ConfigReader) -> int:
    """`num_experts` (hub configs) or `num_local_experts` (saved by transformers 5)."""
    a, b = r.d.pop("num_experts", None), r.d.pop("num_local_experts", None)
    if a is not None and b is not None and a != b:
        raise ConvertError(f"num_experts {a} disagrees with num_local_experts {b}")
    value = a if a is not None else b
    return int(value if value is not None else r.defaults.get("num_experts", 0))


def native_windows(
    r: ConfigReader, window: int | None, slides: list[bool], max_pos: int
) -> tuple[int | None, ...]:
    """Each layer's native sliding window: the config's `layer_types` if it gives them, else
    `window` on the layers `slides` marks (as the family's transformers config derives them).
    One entry of `slides` per layer."""
    types = r.take("layer_types")
    if types is None and window is not None:
        types = ["sliding_attention" if s else "full_attention" for s in slides]
    return layer_windows(types, window, len(slides), max_pos)


def with_window(attention: Attention, window: int | None) -> Attention:
    """`attention` as a native sliding-window layer of `window` (None: full)."""
    return attention if window is None else dataclasses.replace(attention, sliding_window=window)


def windowed_layers(
    attention: Attention, mlp: Mlp, norm: Norm, windows: tuple[int | None, ...]
) -> list[LayerSpec]:
    """Layers of one kind, each with its native sliding window of `windows` (None: full)."""
    return [LayerSpec(with_window(attention, w), mlp, norm) for w in windows]


def require(r: ConfigReader, key: str, allowed: tuple, what: str) -> Any:
    """A key that must hold one of `allowed` values, else a refusal naming `what`."""
    value = r.take(key)
    if value not in allowed:
        raise ConvertError(f"{key} = {value!r}: {what} is not supported")
    return value


def bloom_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes of the ALiBi paper, as Bloom, Falcon and BTLM compute them."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return slopes


def uniform_config(
    arch: str, r: ConfigReader, layer: LayerSpec, num_layers: int, final_norm: Norm, **model
) -> ModelConfig:
    """A model whose layers are all `layer`."""
    return model_config(arch, r, (layer,) * num_layers, final_norm, **model)


def model_config(arch: str, r: ConfigReader, layers, final_norm: Norm, **model) -> ModelConfig:
    """A model of the given layers; the keys every family reads alike (`vocab_size`,
    `tie_word_embeddings`) read here."""
    return ModelConfig(
        architecture=arch,
        vocab_size=r.take("vocab_size"),
        hidden_size=model.pop("hidden_size"),
        layers=tuple(layers),
        final_norm=final_norm,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        **model,
    )
