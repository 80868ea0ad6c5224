"""StableLM: Llama's names with LayerNorm biases, a partial rotary, optional q, k, v biases,
per-head qk-norms and a parallel residual."""

from __future__ import annotations

from jaxsink.config import LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader
from ..tables import Table, llama_layer, stack
from .common import LLAMA_REQUIRED, Family, llama_table, phi_attention, uniform_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden = r.take("hidden_size")
    attention, eps = phi_attention(
        r, hidden, 0.25, qk_norm_bias=False, qkv_bias=bool(r.take("use_qkv_bias"))
    )
    norm = Norm("layer", eps, bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"))
    residual = "parallel_shared" if r.take("use_parallel_residual") else "sequential"
    r.ignore("hidden_dropout")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
    )


def _table(cfg: ModelConfig) -> Table:
    """Llama's names with LayerNorm biases, and one qk-norm module per head."""
    a = cfg.layers[0].attention
    attn = "self_attn"
    heads = {
        "attn.q_norm.scale": (
            tuple(f"{attn}.q_layernorm.norms.{h}.weight" for h in range(a.num_heads)),
            stack,
        ),
        "attn.k_norm.scale": (
            tuple(f"{attn}.k_layernorm.norms.{h}.weight" for h in range(a.num_kv_heads)),
            stack,
        ),
    }
    return llama_table(llama_layer() | heads)


FAMILIES = {
    "stablelm": Family(
        LLAMA_REQUIRED,
        {
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "use_qkv_bias": False,
            "qk_layernorm": False,
            "use_parallel_residual": False,
            "num_key_value_heads": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        _read,
        _table,
    ),
}
