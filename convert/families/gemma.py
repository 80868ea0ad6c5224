"""Gemma 2 and Gemma 3 (text): sandwich norms, (1 + w) RMSNorm, local and global layers; Gemma 2
soft-caps attention and logits, Gemma 3 normalizes queries and keys and gives each layer kind
its own rotary. (Gemma 1 is Llama's layer: `llama`.)"""

from __future__ import annotations

import dataclasses

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader, RopeSpec, read_rope
from ..tables import linear, llama_attention, norm, split_heads, stack
from .common import (
    LLAMA_REQUIRED,
    MODERN,
    Family,
    constant,
    full_rotary,
    llama_table,
    model_config,
    native_windows,
    read_heads,
    require,
    tile_heads,
)


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    """Gemma 2 and Gemma 3 text (the module's docstring)."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = read_heads(r, hidden)
    full_rope, local_rope = _ropes(arch, r, max_pos)
    require(r, "use_bidirectional_attention", (None, False), "bidirectional attention")
    norm = Norm("rms_plus_one", float(r.take("rms_norm_eps")))
    gemma3 = arch == "gemma3_text"
    if gemma3:  # stored, but transformers' Gemma 3 attention never applies it
        r.ignore("attn_logit_softcapping")
    biased = bool(r.take("attention_bias"))
    attention = Attention(
        num_heads,
        kv_heads,
        head_dim,
        None,
        float(r.take("query_pre_attn_scalar")) ** -0.5,
        qkv_bias=biased,
        out_bias=biased,
        qk_norm=norm if gemma3 else None,
        softcap=None if gemma3 else r.explicit("attn_logit_softcapping"),
    )
    act = r.take("hidden_activation") or r.take("hidden_act")
    mlp = Mlp(r.take("intermediate_size"), act)
    windows = _windows(arch, r, num_layers, max_pos)

    def layer(window):
        rope = full_rope if window is None else local_rope
        spec = dataclasses.replace(
            attention, position=full_rotary(rope, head_dim), sliding_window=window
        )
        return LayerSpec(spec, mlp, norm, norms="pre_post")

    return model_config(
        arch,
        r,
        [layer(w) for w in windows],
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        embed_scale=hidden**0.5,
        final_softcap=r.explicit("final_logit_softcapping"),
    )


def _ropes(arch: str, r: ConfigReader, max_pos: int) -> tuple[RopeSpec, RopeSpec]:
    """(full layers' rope, sliding layers' rope). Gemma 3 gives each layer kind its own:
    `rope_parameters` keyed by layer kind (transformers 5), or `rope_theta` + `rope_scaling` for
    full layers and `rope_local_base_freq` for sliding ones (4.x)."""
    if arch == "gemma2":
        rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
        return rope, rope
    params = r.d.get("rope_parameters")
    local_base = r.take("rope_local_base_freq")
    if isinstance(params, dict) and set(params) <= {"full_attention", "sliding_attention"}:
        r.d.pop("rope_parameters")
        r.ignore("rope_theta", "rope_scaling")  # folded into the nested dict by transformers
        full = read_rope({"rope_parameters": params.get("full_attention")}, 1e6, max_pos)
        local = read_rope({"rope_parameters": params.get("sliding_attention")}, 1e4, max_pos)
        return full, local
    full = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    return full, RopeSpec(float(local_base), None)


def _windows(arch: str, r: ConfigReader, num_layers: int, max_pos: int) -> tuple:
    """Each layer's native sliding window when the config gives no `layer_types`: Gemma 2
    slides every other layer (the first sliding), Gemma 3 all but every
    `sliding_window_pattern`-th."""
    window = r.take("sliding_window")
    if arch == "gemma2":
        slides = [(i + 1) % 2 != 0 for i in range(num_layers)]
    else:
        pattern = r.take("sliding_window_pattern", 6)
        r.ignore("_sliding_window_pattern")
        slides = [(i + 1) % pattern != 0 for i in range(num_layers)]
    return native_windows(r, window, slides, max_pos)


GEMMA2 = llama_table(
    {
        **norm("norm", "input_layernorm"),
        **norm("post_attn_norm", "post_attention_layernorm"),
        **norm("mlp_norm", "pre_feedforward_layernorm"),
        **norm("post_mlp_norm", "post_feedforward_layernorm"),
        **llama_attention("self_attn"),
        **linear("attn.out", "self_attn.o_proj", split_heads),
        "attn.q_norm.scale": (("self_attn.q_norm.weight",), tile_heads),
        "attn.k_norm.scale": (("self_attn.k_norm.weight",), tile_heads),
        "mlp.up": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), stack),
        **linear("mlp.down", "mlp.down_proj"),
    }
)

# transformers' defaults that Gemma 2 and Gemma 3 share
_DEFAULTS = MODERN | {
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

FAMILIES = {
    "gemma2": Family(
        LLAMA_REQUIRED,
        _DEFAULTS
        | {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "max_position_embeddings": 8192,
        },
        _read,
        constant(GEMMA2),
    ),
    "gemma3_text": Family(
        LLAMA_REQUIRED,
        _DEFAULTS
        | {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "max_position_embeddings": 131072},
        _read,
        constant(GEMMA2),
    ),
}
