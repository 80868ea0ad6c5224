"""BTLM (`BTLMLMHeadModel`, cerebras/btlm-3b-8k-base): published with its checkpoints rather
than in transformers, read as its modeling_btlm.py computes: GPT-2's layout and Conv1D [in, out]
weights, ALiBi, SwiGLU and muP scalings."""

from __future__ import annotations

import numpy as np

from jaxsink.config import Alibi, Attention, LayerSpec, Mlp, ModelConfig, Norm

from ..errors import ConvertError
from ..hf import ConfigReader
from ..tables import Table, identity, layer_rules, linear, norm, outer, stack
from .common import GPT2_REQUIRED, Family, bloom_slopes, fuse_thirds, model_config, require


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    """BTLM as its modeling_btlm.py computes: GPT-2 layout, ALiBi, SwiGLU and muP scalings."""
    hidden, num_heads = r.take("n_embd"), r.take("n_head")
    head_dim = hidden // num_heads
    require(r, "position_embedding_type", ("alibi",), "BTLM with learned positions")
    scaling = r.take("alibi_scaling")
    divisor = 1.0
    if scaling is not None:
        if set(scaling) - {"type", "factor"} or scaling.get("type", "linear") != "linear":
            raise ConvertError(
                f"alibi_scaling {scaling}: only a fixed linear factor is supported (a "
                "train_seq_len rescales the bias with the total length at every step)"
            )
        divisor = float(scaling["factor"])
    slopes = tuple(s / divisor for s in bloom_slopes(num_heads))
    power = 1.0 if r.take("mup_scale_qk_dot_by_d") else 0.5
    scale = head_dim**-power if r.take("scale_attn_weights") else 1.0
    by_layer = bool(r.take("scale_attn_by_inverse_layer_idx"))
    act = r.take("activation_function")
    gated = act == "swiglu"
    mlp = Mlp(r.take("n_inner") or 4 * hidden, "silu" if gated else act, gated=gated, bias=True)
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)

    def layer(i: int) -> LayerSpec:
        s = scale / (i + 1) if by_layer else scale
        attention = Attention(num_heads, num_heads, head_dim, Alibi(slopes), s, True, True)
        return LayerSpec(attention, mlp, norm)

    r.ignore("attn_pdrop", "embd_pdrop", "resid_pdrop", "reorder_and_upcast_attn", "auto_map")
    return model_config(
        arch,
        r,
        [layer(i) for i in range(r.take("n_layer"))],
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("n_positions"),
        embed_scale=float(r.take("mup_embeddings_scale")),
        logit_scale=float(r.take("mup_output_alpha")) * float(r.take("mup_width_scale")),
    )


# --- GPT-2's Conv1D layout ([in, out] weights) ----------------------------------------------


def conv_thirds(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D qkv weight [D, 3 * N * H] (input-major) -> [N, 3, H, D]."""
    return fuse_thirds(w.T, shape)


def conv_out(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D output projection [N * H, D] (input-major) -> [D, N, H]."""
    return w.T.reshape(shape)


def transposed(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D weight [in, out] -> [out, in]."""
    return w.T


def conv_gate_up(gate: np.ndarray, up: np.ndarray, shape) -> np.ndarray:
    """Conv1D gate and up weights [D, F] -> [2, F, D]."""
    return np.stack([gate.T, up.T])


def _table(cfg: ModelConfig) -> Table:
    """GPT-2 names and Conv1D [in, out] weights; the stored ALiBi slopes must be the standard
    ones the config implies."""
    n = cfg.layers[0].attention.num_heads
    gated = cfg.layers[0].mlp.gated
    up = {
        "mlp.up": (("mlp.c_fc2.weight", "mlp.c_fc.weight"), conv_gate_up)  # c_fc2 is the gate
        if gated
        else (("mlp.c_fc.weight",), transposed),
        "mlp.up_bias": (("mlp.c_fc2.bias", "mlp.c_fc.bias"), stack)
        if gated
        else (("mlp.c_fc.bias",), identity),
    }
    slopes = np.asarray(bloom_slopes(n), np.float32)[:, None]
    return Table(
        rules=(
            *outer("transformer.wte", "transformer.ln_f"),
            *layer_rules(
                "transformer.h.{i}",
                {
                    **norm("norm", "ln_1"),
                    **norm("mlp_norm", "ln_2"),
                    **linear("attn.qkv", "attn.c_attn", conv_thirds, fuse_thirds),
                    **linear("attn.out", "attn.c_proj", conv_out),
                    **up,
                    **linear("mlp.down", "mlp.c_proj", transposed),
                },
            ),
        ),
        ignored_suffixes=("attn.bias", "attn.masked_bias"),
        tied_copy=("lm_head.weight", "transformer.wte.weight"),
        constants=(("transformer.relative_pe.slopes", slopes),),
    )


FAMILIES = {
    "btlm": Family(
        GPT2_REQUIRED,
        {
            "n_positions": 1024,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "position_embedding_type": "learned",
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "mup_scale_qk_dot_by_d": False,
            "mup_embeddings_scale": 1.0,
            "mup_output_alpha": 1.0,
            "mup_width_scale": 1.0,
            "tie_word_embeddings": True,
        },
        _read,
        _table,
    ),
}
