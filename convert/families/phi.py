"""Phi (phi-1, phi-1.5, phi-2): a partial rotary, LayerNorms, parallel attention and MLP under
one norm, biases everywhere, optional qk-norms shared by the heads."""

from __future__ import annotations

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader, read_rope
from ..tables import Table, layer_rules, linear, llama_attention, norm, outer, split_heads
from .common import (
    LLAMA_REQUIRED,
    Family,
    constant,
    head_rotary,
    rotated_fraction,
    tile_heads,
    uniform_config,
)


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    head_dim = hidden // num_heads
    rope = read_rope(r.d, r.defaults["rope_theta"])
    partial = rotated_fraction(r, rope, "partial_rotary_factor", 0.5)
    eps = float(r.take("layer_norm_eps"))
    attention = Attention(
        num_heads,
        r.take("num_key_value_heads") or num_heads,
        head_dim,
        head_rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qkv_bias=True,
        out_bias=True,
        qk_norm=Norm("layer", eps, bias=True) if r.take("qk_layernorm") else None,
    )
    norm = Norm("layer", eps, bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"), gated=False, bias=True)
    r.ignore("resid_pdrop", "embd_pdrop")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm, "parallel_shared"),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        lm_head_bias=True,
    )


PHI = Table(
    rules=(
        *outer("model.embed_tokens", "model.final_layernorm"),
        *layer_rules(
            "model.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **llama_attention("self_attn"),
                **linear("attn.out", "self_attn.dense", split_heads),
                "attn.q_norm.scale": (("self_attn.q_layernorm.weight",), tile_heads),
                "attn.q_norm.bias": (("self_attn.q_layernorm.bias",), tile_heads),
                "attn.k_norm.scale": (("self_attn.k_layernorm.weight",), tile_heads),
                "attn.k_norm.bias": (("self_attn.k_layernorm.bias",), tile_heads),
                **linear("mlp.up", "mlp.fc1"),
                **linear("mlp.down", "mlp.fc2"),
            },
        ),
    ),
    ignored_suffixes=("rotary_emb.inv_freq",),
    tied_copy=("lm_head.weight", "model.embed_tokens.weight"),
)

FAMILIES = {
    "phi": Family(
        LLAMA_REQUIRED,
        {
            "hidden_act": "gelu_new",
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "qk_layernorm": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        _read,
        constant(PHI),
    ),
}
