"""GPT-NeoX (Pythia): partial rotary, LayerNorms, a parallel or sequential residual."""

from __future__ import annotations

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader, read_rope
from ..tables import Table, layer_rules, linear, norm, outer, split_heads
from .common import REQUIRED, Family, constant, head_rotary, rotated_fraction, uniform_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    rope = read_rope(r.d, float(r.d.pop("rotary_emb_base", None) or 10000.0))
    head_dim = hidden // num_heads
    partial = rotated_fraction(r, rope, "rotary_pct", 0.25)
    r.derived("partial_rotary_factor", partial, "rotary_pct")  # transformers 4.x writes both
    biased = bool(r.take("attention_bias"))
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        head_rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qkv_bias=biased,
        out_bias=biased,
    )
    norm = Norm("layer", float(r.take("layer_norm_eps")), bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"), gated=False, bias=True)
    residual = "parallel" if r.take("use_parallel_residual") else "sequential"
    r.ignore("classifier_dropout", "hidden_dropout")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
    )


GPT_NEOX = Table(
    rules=(
        *outer("gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
        *layer_rules(
            "gpt_neox.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("mlp_norm", "post_attention_layernorm"),
                # rows per head: [N, 3 (q, k, v), H]: already [K = N, G + 2 = 3, H]
                **linear("attn.qkv", "attention.query_key_value", split_heads, split_heads),
                **linear("attn.out", "attention.dense", split_heads),
                **linear("mlp.up", "mlp.dense_h_to_4h"),
                **linear("mlp.down", "mlp.dense_4h_to_h"),
            },
        ),
    ),
    ignored_suffixes=("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"),
    aliases=(("embed_out.weight", "lm_head.weight"),),
    tied_copy=("lm_head.weight", "gpt_neox.embed_in.weight"),
)

FAMILIES = {
    "gpt_neox": Family(
        (*REQUIRED, "intermediate_size"),
        {
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu",
            "use_parallel_residual": True,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        _read,
        constant(GPT_NEOX),
    ),
}
