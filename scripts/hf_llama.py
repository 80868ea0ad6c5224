"""A transformers Llama holding a jaxsink checkpoint's weights: the baseline model of
`bench.py` (its transformers worker) and `ppl_speed.py` when no Hugging Face folder is given.

Needs torch and transformers (test dependencies); imports them when called.
"""

from __future__ import annotations


def hf_llama_from_checkpoint(path):
    """A transformers Llama model holding exactly the weights of a jaxsink checkpoint.

    Only uniform Llama-layout configs (RMSNorm, gated silu MLP, full half-split rotary, no
    biases or scaling) are rebuilt; anything else raises ValueError.
    """
    import dataclasses

    import torch
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
