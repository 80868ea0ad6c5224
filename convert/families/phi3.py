"""Phi-3: Llama's layer with fused q, k, v and gate, up projections, longrope, native sliding
windows."""

from __future__ import annotations

import numpy as np

from jaxsink.config import Attention, Mlp, ModelConfig, Norm

from ..hf import ConfigReader, read_rope
from ..tables import fuse_qkv, linear, norm, split_halves, split_heads
from .common import (
    LLAMA_REQUIRED,
    MODERN,
    Family,
    constant,
    head_rotary,
    llama_table,
    model_config,
    native_windows,
    read_heads,
    rotated_fraction,
    windowed_layers,
)


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = read_heads(r, hidden)
    for key in ("rope_parameters", "rope_scaling"):  # Phi-3 reads "su" and "yarn" as longrope
        if isinstance(r.d.get(key), dict):
            spec = dict(r.d[key])
            for k in ("rope_type", "type"):
                if spec.get(k) in ("su", "yarn"):
                    spec[k] = "longrope"
            r.d[key] = spec
    original = r.take("original_max_position_embeddings")
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos, original)
    partial = rotated_fraction(r, rope, "partial_rotary_factor", 1.0)
    attention = Attention(
        num_heads, kv_heads, head_dim, head_rotary(rope, head_dim, partial), head_dim**-0.5
    )
    norm = Norm("rms", float(r.take("rms_norm_eps")))
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"))
    windows = native_windows(r, r.take("sliding_window"), [True] * num_layers, max_pos)
    r.ignore("resid_pdrop", "embd_pdrop")
    layers = windowed_layers(attention, mlp, norm, windows)
    return model_config(arch, r, layers, norm, hidden_size=hidden, max_position_embeddings=max_pos)


def split_qkv(w: np.ndarray, shape) -> np.ndarray:
    """One [(N + 2K) * H, D] projection, q then k then v rows (Phi-3) -> [K, G + 2, H, D]."""
    K, E, H, *_ = shape
    q, k, v = np.split(w, [K * (E - 2) * H, K * (E - 1) * H], axis=0)
    return fuse_qkv(q, k, v, shape)


PHI3 = llama_table(
    {
        **norm("norm", "input_layernorm"),
        **norm("mlp_norm", "post_attention_layernorm"),
        "attn.qkv": (("self_attn.qkv_proj.weight",), split_qkv),
        **linear("attn.out", "self_attn.o_proj", split_heads),
        "mlp.up": (("mlp.gate_up_proj.weight",), split_halves),
        **linear("mlp.down", "mlp.down_proj"),
    }
)

FAMILIES = {
    "phi3": Family(
        LLAMA_REQUIRED,
        MODERN | {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
        _read,
        constant(PHI3),
    ),
}
