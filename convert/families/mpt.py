"""MPT (MosaicML): ALiBi, fused Wqkv, LayerNorms without biases; the MLP width read from the
weights."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jaxsink.config import Alibi, Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..hf import ConfigReader
from ..tables import Table, layer_rules, linear, norm, outer, split_heads
from .common import Family, constant, fuse_thirds, require, uniform_config

# Keys of MPT's nested `attn_config` that a saved transformers config carries and that change
# nothing (the PretrainedConfig fields of MptAttentionConfig, dropout, the kernel choice).
_ATTN_HARMLESS = {"attn_pdrop", "attn_impl", "_name_or_path", "model_type"}
_ATTN_DEFAULTS = {"attn_type": "multihead_attention", "alibi": True, "alibi_bias_max": 8}


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden, num_heads = r.take("d_model"), r.take("n_heads")
    head_dim = hidden // num_heads
    attn = ConfigReader(r.take("attn_config") or {}, _ATTN_DEFAULTS)
    require(attn, "attn_type", ("multihead_attention",), "MPT attention other than multi-head")
    require(attn, "alibi", (True,), "MPT without ALiBi (learned positions)")
    for key, what in (
        ("prefix_lm", "prefix-LM attention"),
        ("qk_ln", "qk LayerNorm (transformers' MPT lacks it)"),
        ("attn_uses_sequence_id", "sequence-id masking"),
    ):
        require(attn, key, (False, None), what)
    scale = attn.take("softmax_scale") or head_dim**-0.5
    clip = attn.take("clip_qkv")
    slopes = mpt_slopes(num_heads, float(attn.take("alibi_bias_max")))
    attn.ignore(*_ATTN_HARMLESS)
    attn.check_all_read(f"{arch}'s attn_config")
    attention = Attention(
        num_heads, num_heads, head_dim, Alibi(tuple(slopes)), scale, clip_qkv=clip or None
    )
    require(r, "no_bias", (True,), "MPT with biases")
    require(r, "logit_scale", (None,), "an MPT logit_scale")
    require(r, "embedding_fraction", (1.0,), "an MPT embedding_fraction other than 1")
    require(r, "norm_type", ("low_precision_layernorm", "layernorm"), "this MPT norm_type")
    norm = Norm("layer", float(r.take("layer_norm_epsilon")))
    # The width as MosaicML's code computes it; `_widths` replaces it by the weights'.
    mlp = Mlp(r.take("expansion_ratio") * hidden, "gelu", gated=False)
    r.ignore("resid_pdrop", "emb_pdrop", "init_device", "learned_pos_emb", "verbose")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm),
        r.take("n_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_seq_len"),
    )


def mpt_slopes(num_heads: int, bias_max: float) -> list[float]:
    """MPT's ALiBi slopes (`alibi_bias_max` spreads them)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = [1.0 / 2 ** ((i + 1) * bias_max / n) for i in range(n)]
    if n != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return slopes


def _widths(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """MPT's MLP width from its up projection's rows: transformers builds it 4 x d_model wide
    whatever `expansion_ratio` says, MosaicML's own code `expansion_ratio` x d_model wide, and
    both save the same config key, so the tensors are the only truth."""
    rows = {s[0] for n, s in shapes.items() if n.endswith("ffn.up_proj.weight") and s}
    if len(rows) != 1:  # none, or layers that differ: build_params names what is wrong
        return cfg
    width = rows.pop()
    layers = tuple(
        dataclasses.replace(layer, mlp=dataclasses.replace(layer.mlp, size=width))
        for layer in cfg.layers
    )
    return dataclasses.replace(cfg, layers=layers)


MPT = Table(
    rules=(
        *outer("transformer.wte", "transformer.norm_f"),
        *layer_rules(
            "transformer.blocks.{i}",
            {
                **norm("norm", "norm_1"),
                **norm("mlp_norm", "norm_2"),
                **linear("attn.qkv", "attn.Wqkv", fuse_thirds, fuse_thirds),
                **linear("attn.out", "attn.out_proj", split_heads),
                **linear("mlp.up", "ffn.up_proj"),
                **linear("mlp.down", "ffn.down_proj"),
            },
        ),
    ),
    tied_copy=("lm_head.weight", "transformer.wte.weight"),
)

FAMILIES = {
    "mpt": Family(
        ("vocab_size", "d_model", "n_heads", "n_layers"),
        {
            "expansion_ratio": 4,
            "max_seq_len": 2048,
            "layer_norm_epsilon": 1e-5,
            "no_bias": True,
            "embedding_fraction": 1.0,
            "norm_type": "low_precision_layernorm",
            "tie_word_embeddings": True,
        },
        _read,
        constant(MPT),
        _widths,
    ),
}
