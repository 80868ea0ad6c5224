"""Bloom: ALiBi (its bias added to the scaled scores), a LayerNorm on the embeddings."""

from __future__ import annotations

from jaxsink.config import Alibi, Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..errors import ConvertError
from ..hf import ConfigReader
from ..tables import Rule, Table, layer_rules, linear, norm, outer, split_heads
from .common import Family, bloom_slopes, constant, model_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden = r.take("hidden_size") or r.take("n_embed")
    num_heads = r.take("n_head")
    head_dim = hidden // num_heads
    if r.take("apply_residual_connection_post_layernorm"):
        raise ConvertError("apply_residual_connection_post_layernorm is not supported")
    if r.take("n_inner") is not None:
        raise ConvertError("a Bloom n_inner is not supported (transformers uses 4 x hidden)")
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        Alibi(tuple(bloom_slopes(num_heads))),
        head_dim**-0.5,
        qkv_bias=True,
        out_bias=True,
    )
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)
    mlp = Mlp(4 * hidden, "gelu_pytorch_tanh", gated=False, bias=True)
    # Tensor-parallel slicing of the same products, fused kernels, dropout: same function.
    r.ignore(
        "pretraining_tp",
        "slow_but_exact",
        "hidden_dropout",
        "masked_softmax_fusion",
        "attention_softmax_in_fp32",
        "bias_dropout_fusion",
        "skip_bias_add",
        "skip_bias_add_qkv",
        "offset_alibi",
    )
    return model_config(
        arch,
        r,
        [LayerSpec(attention, mlp, norm)] * r.take("n_layer"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("seq_length", 2048),
        embed_norm=norm,
    )


BLOOM = Table(
    rules=(
        *outer("transformer.word_embeddings", "transformer.ln_f"),
        *(
            Rule(target, sources, f)
            for target, (sources, f) in norm(
                "embed_norm", "transformer.word_embeddings_layernorm"
            ).items()
        ),
        *layer_rules(
            "transformer.h.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("mlp_norm", "post_attention_layernorm"),
                # rows per head [N, 3 (q, k, v), H]: already [K = N, G + 2 = 3, H]
                **linear("attn.qkv", "self_attention.query_key_value", split_heads, split_heads),
                **linear("attn.out", "self_attention.dense", split_heads),
                **linear("mlp.up", "mlp.dense_h_to_4h"),
                **linear("mlp.down", "mlp.dense_4h_to_h"),
            },
        ),
    ),
    tied_copy=("lm_head.weight", "transformer.word_embeddings.weight"),
    base_prefix="transformer.",  # bigscience's own checkpoints are saved from BloomModel
)

FAMILIES = {
    "bloom": Family(
        ("vocab_size",),
        {
            "hidden_size": 64,
            "n_layer": 2,
            "n_head": 8,
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        _read,
        constant(BLOOM),
    ),
}
