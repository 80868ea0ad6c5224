"""Falcon: the RW layout (multi-query or multi-head) and the new decoder architecture (grouped
kv heads, one or two parallel norms); rotary or ALiBi."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxsink.config import Alibi, Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..errors import ConvertError
from ..hf import ConfigReader, read_rope
from ..tables import Table, layer_rules, linear, norm, outer, split_heads
from .common import Family, bloom_slopes, head_rotary, uniform_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden = r.take("hidden_size")
    num_heads = r.take("n_head") or r.take("num_attention_heads")  # older configs: n_*
    num_layers = r.take("n_layer") or r.take("num_hidden_layers")
    head_dim = hidden // num_heads
    new = bool(r.take("new_decoder_architecture"))
    multi_query = bool(r.take("multi_query"))
    kv_heads = r.take("n_head_kv") or r.take("num_kv_heads")
    if not new:  # the RW layout: one shared kv head, or plain multi-head
        kv_heads = 1 if multi_query else num_heads
    kv_heads = kv_heads or num_heads
    r.derived(
        "num_key_value_heads", kv_heads, "multi_query, new_decoder_architecture and num_kv_heads"
    )
    parallel = bool(r.take("parallel_attn"))
    n_ln = r.take("num_ln_in_parallel_attn")
    if new and n_ln is None:
        n_ln = 2
    if r.take("apply_residual_connection_post_layernorm", False):
        raise ConvertError("apply_residual_connection_post_layernorm is not supported")
    rope = read_rope(r.d, r.defaults["rope_theta"])
    if r.take("alibi"):
        # Falcon's code rounds the slopes to bfloat16 and scales the bias with q . k.
        slopes = np.asarray(bloom_slopes(num_heads), ml_dtypes.bfloat16).astype(np.float64)
        position = Alibi(tuple(float(s) * head_dim**-0.5 for s in slopes))
    else:
        position = head_rotary(rope, head_dim, None)
    biased = bool(r.take("bias"))
    attention = Attention(num_heads, kv_heads, head_dim, position, head_dim**-0.5, biased, biased)
    if new and n_ln == 2:
        residual = "parallel"
    elif (new and n_ln == 1 and parallel) or (not new and parallel):
        residual = "parallel_shared"
    elif not new:
        residual = "sequential"
    else:
        raise ConvertError("new_decoder_architecture with one norm and no parallel_attn")
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)
    size = r.take("ffn_hidden_size") or 4 * hidden
    mlp = Mlp(size, r.take("activation"), gated=False, bias=biased)
    r.ignore("hidden_dropout", "attention_dropout")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        num_layers,
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
    )


def _table(cfg: ModelConfig) -> Table:
    """Falcon names its norms after the residual kind: two parallel ones `ln_attn`/`ln_mlp`."""
    two = cfg.layers[0].residual == "parallel"
    attn_norm, mlp_norm = (
        ("ln_attn", "ln_mlp") if two else ("input_layernorm", "post_attention_layernorm")
    )
    return Table(
        rules=(
            *outer("transformer.word_embeddings", "transformer.ln_f"),
            *layer_rules(
                "transformer.h.{i}",
                {
                    **norm("norm", attn_norm),
                    **norm("mlp_norm", mlp_norm),
                    # [K, G + 2, H] (grouped), [1, N + 2, H] (multi-query) or [N, 3, H] rows:
                    # each already the fused layout
                    **linear(
                        "attn.qkv", "self_attention.query_key_value", split_heads, split_heads
                    ),
                    **linear("attn.out", "self_attention.dense", split_heads),
                    **linear("mlp.up", "mlp.dense_h_to_4h"),
                    **linear("mlp.down", "mlp.dense_4h_to_h"),
                },
            ),
        ),
        ignored_suffixes=("rotary_emb.inv_freq",),
        tied_copy=("lm_head.weight", "transformer.word_embeddings.weight"),
    )


FAMILIES = {
    "falcon": Family(
        ("vocab_size", "hidden_size"),
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 71,
            "layer_norm_epsilon": 1e-5,
            "new_decoder_architecture": False,
            "multi_query": True,
            "parallel_attn": True,
            "alibi": False,
            "bias": False,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "activation": "gelu",
            "tie_word_embeddings": True,
            "bos_token_id": 11,
            "eos_token_id": 11,
        },
        _read,
        _table,
    ),
}
