"""transformers (PyTorch) on a jaxsink checkpoint's weights, for the scripts that compare with it
(needs torch and transformers, test dependencies):

- `hf_llama_from_checkpoint`: a transformers Llama holding a jaxsink checkpoint's weights, the
  baseline model of `bench.py`'s transformers worker and of `ppl_speed.py`;
- `reference_nll`: the reference loop of the streaming contract, one token per forward, as
  StreamingLLM's pos-shift mode and `attention_sinks` 0.4.0 do: every layer's keys are cached
  *before* RoPE; after each token the cache is evicted down to the S sinks plus the W most
  recent tokens; the kept keys are rotated to their cache-order positions 0..L-1 and the query
  sits at L. The model's own modules (projections, norms, MLP, rotary embedding) compute
  everything else (`ppl_speed.py` compares `jaxsink ppl` with it).

The tests load this file as their reference too (`tests/support/torch_reference.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.llama.modeling_llama import rotate_half


def _rope(x, cos, sin):
    """x: [1, heads, T, H]; cos, sin: [1, T, H] (HF rotate_half layout)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@torch.inference_mode()
def reference_nll(hf_model, ids, sinks: int, window: int, dense: bool = False) -> np.ndarray:
    """Per-token NLL [N] of ids (N + 1 tokens) under the streaming contract, float64 accumulation."""
    core = hf_model.model
    cfg = hf_model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = core.layers
    keys: list[torch.Tensor | None] = [None] * len(layers)  # [1, n_kv, T, H], un-rotated
    values: list[torch.Tensor | None] = [None] * len(layers)
    out = []
    for t in range(len(ids) - 1):
        x = core.embed_tokens(torch.tensor([[int(ids[t])]]))
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, n_heads, head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, n_kv, head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, n_kv, head_dim).transpose(1, 2)
            keys[i] = k if keys[i] is None else torch.cat([keys[i], k], dim=2)
            values[i] = v if values[i] is None else torch.cat([values[i], v], dim=2)
            length = keys[i].shape[2]  # cached tokens plus this one: positions 0 .. length-1
            cos, sin = core.rotary_emb(x, torch.arange(length)[None])
            q = _rope(q, cos[:, -1:], sin[:, -1:])
            k_all = _rope(keys[i], cos, sin).repeat_interleave(n_heads // n_kv, dim=1)
            v_all = values[i].repeat_interleave(n_heads // n_kv, dim=1)
            scores = (q @ k_all.transpose(-1, -2)) * head_dim**-0.5
            a = torch.softmax(scores.float(), dim=-1).to(v_all.dtype) @ v_all
            x = x + attn.o_proj(a.transpose(1, 2).reshape(1, 1, n_heads * head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if not dense and keys[i].shape[2] > sinks + window:  # evict: keep sinks + window
                keep = torch.cat([torch.arange(sinks), torch.arange(length - window, length)])
                keys[i], values[i] = keys[i][:, :, keep], values[i][:, :, keep]
        logits = hf_model.lm_head(core.norm(x))[0, -1].double()
        out.append(float(torch.logsumexp(logits, 0) - logits[int(ids[t + 1])]))
    return np.asarray(out)


def hf_llama_from_checkpoint(path):
    """A transformers Llama model holding exactly the weights of a jaxsink checkpoint.

    Only uniform Llama-layout configs (RMSNorm, gated silu MLP, full half-split rotary, no
    biases or scaling) are rebuilt; anything else raises ValueError.
    """
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxsink.checkpoint import load_params, read_config
    from jaxsink.config import Attention, LayerSpec, Mlp, Norm, Rotary

    cfg, _ = read_config(path)
    spec = cfg.layers[0]
    a = spec.attention
    rotary = a.position if isinstance(a.position, Rotary) else None
    llama = LayerSpec(
        Attention(
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            Rotary(rotary.theta, a.head_dim) if rotary else None,
            a.head_dim**-0.5,
        ),
        Mlp(spec.mlp.size, spec.mlp.activation),
        Norm("rms", spec.norm.eps),
    )
    plain = dataclasses.replace(cfg, eos_token_ids=(), bos_token_id=None, architecture="llama")
    if any(layer != llama for layer in cfg.layers) or plain != dataclasses.replace(
        plain, final_norm=llama.norm, embed_scale=1.0, logit_scale=1.0, lm_head_bias=False
    ):
        raise ValueError(
            f"cannot rebuild a transformers Llama for {path} (not a plain Llama layout): "
            "use the Hugging Face folder it came from"
        )
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=spec.mlp.size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim,
        hidden_act=spec.mlp.activation,
        rms_norm_eps=spec.norm.eps,
        rope_theta=rotary.theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None,
    )
    flat = {k: v.astype("float32") for k, v in load_params(path, cfg).items()}
    D, N, K, H, G = cfg.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.group
    sd = {"model.embed_tokens.weight": flat["embed"], "model.norm.weight": flat["final_norm.scale"]}
    for i in range(cfg.num_layers):
        p, w = f"model.layers.{i}.", f"layers.{i}."
        qkv = flat[w + "attn.qkv"]  # [K, G + 2, H, D]
        sd[p + "self_attn.q_proj.weight"] = qkv[:, :G].reshape(N * H, D)
        sd[p + "self_attn.k_proj.weight"] = qkv[:, G].reshape(K * H, D)
        sd[p + "self_attn.v_proj.weight"] = qkv[:, G + 1].reshape(K * H, D)
        sd[p + "self_attn.o_proj.weight"] = flat[w + "attn.out"].reshape(D, N * H)
        sd[p + "mlp.gate_proj.weight"] = flat[w + "mlp.up"][0]
        sd[p + "mlp.up_proj.weight"] = flat[w + "mlp.up"][1]
        sd[p + "mlp.down_proj.weight"] = flat[w + "mlp.down"]
        sd[p + "input_layernorm.weight"] = flat[w + "norm.scale"]
        sd[p + "post_attention_layernorm.weight"] = flat[w + "mlp_norm.scale"]
    sd["lm_head.weight"] = flat["embed"] if cfg.tie_embeddings else flat["lm_head"]
    model = LlamaForCausalLM(hf_cfg)
    state = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"rebuilding the transformers model: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.float().eval()
