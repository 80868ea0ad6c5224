"""Phi (phi-1, phi-1.5, phi-2): a partial rotary, LayerNorms, parallel attention and MLP under
one norm, biases everywhere, optional qk-norms shared by the heads."""

from __future__ import annotations

from jaxsink.config import LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader
from ..tables import linear, llama_attention, norm, split_heads
from .common import (
    LLAMA_REQUIRED,
    Family,
    constant,
    llama_table,
    phi_attention,
    tile_heads,
    uniform_config,
)


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden = r.take("hidden_size")
    attention, eps = phi_attention(r, hidden, 0.5, qk_norm_bias=True, qkv_bias=True, out_bias=True)
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
        lm_head_bias=True,
    )


# Llama's names but for the final norm, the attention's output and the MLP
PHI = llama_table(
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
    final_norm="model.final_layernorm",
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
