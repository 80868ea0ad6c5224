"""Llama and the families that keep its layer and its tensor names: Mistral, Qwen2, Gemma (1),
Qwen3, Qwen3-MoE, Mixtral, SmolLM3, OLMo 2 and StarCoder2. One reader and one table, with each
family's differences: Gemma's (1 + w) RMSNorm, activation and embedding scale; Qwen2's q, k, v
biases; qk-norms (Qwen3, OLMo 2); experts (Mixtral, Qwen3-MoE); layers without rotary
(SmolLM3); post-norms (OLMo 2); LayerNorms, one bias key and a plain MLP (StarCoder2); native
sliding windows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsink.config import Attention, Experts, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from ..errors import ConvertError
from ..hf import ConfigReader, layer_windows, read_rope
from ..tables import (
    Table,
    identity,
    linear,
    llama_layer,
    norm,
    split_halves,
    stack_experts,
)
from .common import (
    LLAMA_REQUIRED,
    MODERN,
    ROUTER_TRAINING,
    Family,
    full_rotary,
    head_rotary,
    llama_table,
    model_config,
    native_windows,
    num_experts,
    read_heads,
    require,
    tile_heads,
)

# The families read like transformers' first Llama: a `rope_parameters` fraction shortens the
# rotary, the rotary layout flags of Meta's and nanotron's checkpoints are checked, and only
# their own bias keys are read (Mistral and Qwen2 have none).
_CLASSIC = ("llama", "mistral", "qwen2", "gemma")
_QWEN = ("qwen2", "qwen3", "qwen3_moe")  # sliding only with `use_sliding_window`


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    """Llama's layer with each family's differences (the module's docstring)."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = read_heads(r, hidden)
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    if arch in _CLASSIC:
        _check_rotary_layout(arch, r)
        rotary = head_rotary(rope, head_dim, None)
    else:  # these families' code ignores `partial_rotary_factor`
        rotary = full_rotary(rope, head_dim)
    norm, biased, mlp_bias = _norm_and_biases(arch, r)
    attention = Attention(
        num_heads,
        kv_heads,
        head_dim,
        rotary,
        head_dim**-0.5,
        qkv_bias=biased or arch == "qwen2",
        out_bias=biased,
        qk_norm=norm if arch in ("qwen3", "qwen3_moe", "olmo2") else None,
        qk_norm_scope="all" if arch == "olmo2" else "head",
    )
    act = r.take("hidden_act")
    if arch == "gemma":
        require(r, "use_bidirectional_attention", (None, False), "bidirectional attention")
        act = r.take("hidden_activation") or ("gelu_pytorch_tanh" if act == "gelu" else act)
    dense = Mlp(r.take("intermediate_size"), act, gated=arch != "starcoder2", bias=mlp_bias)
    mlps = _mlps(arch, r, dense, num_layers)
    positions = [rotary] * num_layers
    if arch == "smollm3":
        positions, types = _smollm3_positions(r, rotary, num_layers)
        windows = layer_windows(types, r.take("sliding_window"), num_layers, max_pos)
    else:
        windows = _windows(arch, r, num_layers, max_pos)
    if arch not in _CLASSIC:
        r.ignore(*ROUTER_TRAINING, "residual_dropout", "embedding_dropout")
    layers = [
        LayerSpec(
            dataclasses.replace(attention, position=position, sliding_window=window),
            mlp,
            norm,
            norms="post" if arch == "olmo2" else "pre",
        )
        for position, window, mlp in zip(positions, windows, mlps, strict=True)
    ]
    return model_config(
        arch,
        r,
        layers,
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        embed_scale=hidden**0.5 if arch == "gemma" else 1.0,
    )


def _check_rotary_layout(arch: str, r: ConfigReader) -> None:
    """Refuse Meta's tensor-parallel slicing and nanotron's interleaved rotary flag."""
    if arch == "llama" and r.take("pretraining_tp", 1) != 1:
        raise ConvertError("pretraining_tp other than 1 is not supported")
    if r.take("rope_interleaved", False):  # nanotron's flag; transformers ignores it
        raise ConvertError("rope_interleaved true: the weights' rotary layout is ambiguous")


def _norm_and_biases(arch: str, r: ConfigReader) -> tuple[Norm, bool, bool]:
    """(the norm, attention biases, MLP biases): StarCoder2's LayerNorms and its one
    `use_bias`, Gemma's (1 + w) RMSNorm, the others' RMSNorm. Mistral and Qwen2 have no bias
    keys (Qwen2's q, k, v are always biased), Gemma no `mlp_bias`."""
    if arch == "starcoder2":
        biased = bool(r.take("use_bias"))
        return Norm("layer", float(r.take("norm_epsilon")), bias=True), biased, biased
    norm = Norm("rms_plus_one" if arch == "gemma" else "rms", float(r.take("rms_norm_eps")))
    biased = mlp_bias = False
    if arch not in ("mistral", "qwen2"):
        biased = bool(r.take("attention_bias", False))
    if arch not in ("mistral", "qwen2", "gemma"):
        mlp_bias = bool(r.take("mlp_bias", False))
    return norm, biased, mlp_bias


def _mlps(arch: str, r: ConfigReader, dense: Mlp, num_layers: int) -> list[Mlp]:
    """Each layer's MLP: Mixtral's experts in every layer; Qwen3-MoE's in every
    `decoder_sparse_step`-th layer outside `mlp_only_layers` (none without experts)."""
    if arch == "mixtral":
        experts = Experts(num_experts(r), r.take("num_experts_per_tok"), normalize=True)
        return [dataclasses.replace(dense, experts=experts)] * num_layers
    if arch != "qwen3_moe":
        return [dense] * num_layers
    n = num_experts(r)
    only = set(r.take("mlp_only_layers") or ())
    step = r.take("decoder_sparse_step")
    if n == 0:
        return [dense] * num_layers
    top_k, normalize = r.take("num_experts_per_tok"), bool(r.take("norm_topk_prob"))
    moe = Mlp(
        r.take("moe_intermediate_size"), dense.activation, experts=Experts(n, top_k, normalize)
    )
    return [moe if i not in only and (i + 1) % step == 0 else dense for i in range(num_layers)]


def _windows(arch: str, r: ConfigReader, num_layers: int, max_pos: int) -> tuple:
    """Each layer's native sliding window, as the family's transformers config derives it when
    the config gives no `layer_types`: Qwen2 and Qwen3 slide the layers from
    `max_window_layers` on, Qwen3-MoE every layer, both only with `use_sliding_window`; the
    others (Mistral, Mixtral, StarCoder2) every layer."""
    window = r.take("sliding_window")
    if arch not in _QWEN:
        return native_windows(r, window, [True] * num_layers, max_pos)
    if not r.take("use_sliding_window", False):
        window = None  # transformers drops the window unless use_sliding_window
    if arch == "qwen3_moe":
        r.ignore("max_window_layers")  # Qwen3-MoE slides every layer when it slides
        first = 0
    else:
        first = r.take("max_window_layers", 28)
    return native_windows(r, window, [i >= first for i in range(num_layers)], max_pos)


def _smollm3_positions(r: ConfigReader, rotary: Rotary, num_layers: int):
    """SmolLM3's `no_rope_layers` (1: rotary, 0: none; by default every
    `no_rope_layer_interval`-th layer has none) and its layer kinds (only rotary-free layers
    may slide, with `use_sliding_window`)."""
    interval = r.take("no_rope_layer_interval")
    uses = r.take("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(uses) != num_layers or set(uses) - {0, 1}:
        raise ConvertError(f"no_rope_layers must list 0 or 1 for {num_layers} layers")
    types = r.take("layer_types")
    if types is None and r.take("use_sliding_window"):
        types = ["full_attention" if use else "sliding_attention" for use in uses]
    else:
        r.ignore("use_sliding_window")
    return [rotary if use else None for use in uses], types


def _table(cfg: ModelConfig) -> Table:
    """Llama's names, plus each family's: qk-norms (one row per head, or one for all heads),
    post-norms (OLMo 2), StarCoder2's MLP, the experts of Mixtral and Qwen3-MoE."""
    arch = cfg.architecture
    layer = {
        **llama_layer(),
        # Qwen3: one row [H] for every head; OLMo 2: [N * H] over all heads
        "attn.q_norm.scale": (("self_attn.q_norm.weight",), split_heads_or_tile),
        "attn.k_norm.scale": (("self_attn.k_norm.weight",), split_heads_or_tile),
    }
    if arch == "olmo2":
        layer |= norm("post_attn_norm", "post_attention_layernorm")
        layer |= norm("post_mlp_norm", "post_feedforward_layernorm")
    if arch == "starcoder2":
        layer |= linear("mlp.up", "mlp.c_fc") | linear("mlp.down", "mlp.c_proj")
    if arch == "mixtral":
        layer |= _moe_rules(cfg, ("block_sparse_moe", "mlp"), "gate", ("w1", "w3", "w2"))
    if arch == "qwen3_moe":
        moe = _moe_rules(cfg, ("mlp",), "gate", ("gate_proj", "up_proj", "down_proj"))
        layer |= {k: [layer[k], *v] if k in layer else v for k, v in moe.items()}
    return llama_table(layer)


def _moe_rules(cfg: ModelConfig, prefixes: tuple[str, ...], router: str, names: tuple) -> dict:
    """The expert rules of a mixture (none for a dense model): router `{prefix}.{router}`, and
    the experts either per expert (`{prefix}.experts.{e}.{gate, up, down}.weight`, one prefix
    of `prefixes` each) or fused (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F],
    as transformers 5 holds them)."""
    num = next((s.mlp.experts.num for s in cfg.layers if s.mlp.experts), 0)
    if not num:
        return {}
    gate, up, down = names

    def each(prefix, part):
        return tuple(f"{prefix}.experts.{e}.{part}.weight" for e in range(num))

    return {
        "mlp.router": [((f"{p}.{router}.weight",), identity) for p in prefixes],
        "mlp.up": [((*each(p, gate), *each(p, up)), stack_experts) for p in prefixes]
        + [(("mlp.experts.gate_up_proj",), split_halves)],
        "mlp.down": [(each(p, down), stack_experts) for p in prefixes]
        + [(("mlp.experts.down_proj",), identity)],
    }


def split_heads_or_tile(w: np.ndarray, shape) -> np.ndarray:
    """A qk-norm weight: [N * H] (all heads) -> [N, H], or one row [H] for every head."""
    return w.reshape(shape) if w.size == np.prod(shape) else tile_heads(w, shape)


_LLAMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def _family(defaults: dict) -> Family:
    return Family(LLAMA_REQUIRED, defaults, _read, _table)


FAMILIES = {
    "llama": _family(
        _LLAMA_DEFAULTS | {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
    ),
    "mistral": _family(
        _LLAMA_DEFAULTS | {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2}
    ),
    "qwen2": _family(_LLAMA_DEFAULTS | {"max_position_embeddings": 32768}),
    "gemma": _family(
        _LLAMA_DEFAULTS
        | {
            "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "head_dim": 256,
            "bos_token_id": 2,
            "eos_token_id": 1,
        }
    ),
    "qwen3": _family(
        MODERN | {"head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}
    ),
    "qwen3_moe": _family(
        MODERN
        | {
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        }
    ),
    "mixtral": _family(
        MODERN
        | {
            "rope_theta": 1e6,
            "max_position_embeddings": 131072,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        }
    ),
    "smollm3": _family(
        MODERN
        | {
            "rope_theta": 2e6,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "no_rope_layer_interval": 4,
        }
    ),
    "olmo2": _family(MODERN | {"max_position_embeddings": 2048}),
    "starcoder2": _family(
        MODERN
        | {
            "hidden_act": "gelu_pytorch_tanh",
            "norm_epsilon": 1e-5,
            "use_bias": True,
            "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
        }
    ),
}
