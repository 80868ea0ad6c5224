"""An obviously-correct reference of the streaming contract (docs/streaming-contract.md), in
float64 numpy, one token at a time, for any model the per-layer description covers.

It reads the same `ModelConfig` (one `LayerSpec` per layer) and the same flat checkpoint arrays
as jaxsink, but nothing else of it: every token's keys and values are computed once, when the
token is processed, and kept un-rotated for the whole stream (nothing is ever evicted here). For
each query the visible set and the distances d(t, k) are recomputed from scratch with the
contract's formulas; RoPE is applied at the "cache order" positions (the query at L = min(t, K),
each visible key at L - d(t, k)) and ALiBi adds -slope * d(t, k).
"""

from __future__ import annotations

import math

import numpy as np

from jaxsink.config import Alibi, ModelConfig, Norm, Rotary


def _norm(x, spec: Norm, w, b=None):
    """x [..., F] normalized over its last axis as `spec` says."""
    if spec.kind == "layer":
        x = x - x.mean(axis=-1, keepdims=True)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.eps)
    x = x * (1 + w) if spec.kind == "rms_plus_one" else x * w
    return x if b is None else x + b


def _act(name, x):
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(
            x.shape
        )
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # tanh forms


def _rope(x, pos, spec: Rotary):
    """x [..., H] rotated at integer position `pos` in the spec's layout."""
    ang = pos * spec.inv_freq().astype(np.float64)
    cos, sin = np.cos(ang), np.sin(ang)
    r = spec.dim
    if spec.interleaved:
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(
            *x.shape[:-1], r
        )
    else:
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return np.concatenate([out, x[..., r:]], axis=-1)


def spec_view(t: int, sinks: int, window: int, dense: bool = False):
    """Visible keys of query t and their distances d(t, k), straight from the contract."""
    if dense:
        return [(k, t - k) for k in range(t + 1)]
    capacity = sinks + window
    out = []
    for k in range(t + 1):
        if k < sinks:
            out.append((k, min(t, capacity) - k))
        elif k >= t - window:
            out.append((k, t - k))
    return out


def stream_logits(
    flat: dict, cfg: ModelConfig, tokens, sinks: int, window: int, dense: bool = False
):
    """Per-token logits [N, V] of a single stream under the contract (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    L = cfg.num_layers
    keys = [[] for _ in range(L)]  # un-rotated, per layer, per token: [Kh, H]
    values = [[] for _ in range(L)]
    capacity = sinks + window
    out = []
    for t, tok in enumerate(tokens):
        x = p["embed"][tok] * cfg.embed_scale
        view = spec_view(t, sinks, window, dense)
        q_pos = t if dense else min(t, capacity)
        for i, spec in enumerate(cfg.layers):
            lp = {k.removeprefix(f"layers.{i}."): v for k, v in p.items()}
            a = spec.attention
            G = a.group
            h = _norm(x, spec.norm, lp["norm.scale"], lp.get("norm.bias"))
            qkv = np.einsum("d,kehd->keh", h, lp["attn.qkv"])  # [K, G + 2, H]
            if a.qkv_bias:
                qkv = qkv + lp["attn.qkv_bias"]
            if a.clip_qkv is not None:
                qkv = np.clip(qkv, -a.clip_qkv, a.clip_qkv)
            q = qkv[:, :G].reshape(a.num_heads, a.head_dim)
            k, v = qkv[:, G], qkv[:, G + 1]
            if a.qk_norm is not None:
                q = _norm(q, a.qk_norm, lp["attn.q_norm.scale"], lp.get("attn.q_norm.bias"))
                k = _norm(k, a.qk_norm, lp["attn.k_norm.scale"], lp.get("attn.k_norm.bias"))
            keys[i].append(k)
            values[i].append(v)
            att = np.zeros((a.num_heads, a.head_dim))
            for n in range(a.num_heads):
                kvh = n // G
                qn = q[n] if not isinstance(a.position, Rotary) else _rope(q[n], q_pos, a.position)
                scores = []
                for kk, d in view:
                    key = keys[i][kk][kvh]
                    if isinstance(a.position, Rotary):
                        key = _rope(key, q_pos - d, a.position)
                    s = a.query_scale * (qn @ key)
                    if isinstance(a.position, Alibi):
                        s -= a.position.slopes[n] * d
                    scores.append(s)
                scores = np.array(scores)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                att[n] = sum(wi * values[i][kk][kvh] for wi, (kk, _) in zip(w, view, strict=True))
            attn = np.einsum("nh,dnh->d", att, lp["attn.out"])
            if a.out_bias:
                attn = attn + lp["attn.out_bias"]

            def mlp(hm, lp=lp, m=spec.mlp):
                up = np.einsum("...fd,d->...f", lp["mlp.up"], hm)
                if m.bias:
                    up = up + lp["mlp.up_bias"]
                act = _act(m.activation, up[0]) * up[1] if m.gated else _act(m.activation, up)
                y = lp["mlp.down"] @ act
                return y + lp["mlp.down_bias"] if m.bias else y

            if spec.residual == "sequential":
                x = x + attn
                x = x + mlp(_norm(x, spec.norm, lp["mlp_norm.scale"], lp.get("mlp_norm.bias")))
            elif spec.residual == "parallel":
                h2 = _norm(x, spec.norm, lp["mlp_norm.scale"], lp.get("mlp_norm.bias"))
                x = x + attn + mlp(h2)
            else:
                x = x + attn + mlp(h)
        x = _norm(x, cfg.final_norm, p["final_norm.scale"], p.get("final_norm.bias"))
        head = p["embed"] if cfg.tie_embeddings else p["lm_head"]
        logits = head @ x
        if cfg.lm_head_bias:
            logits = logits + p["lm_head_bias"]
        out.append(logits * cfg.logit_scale)
    return np.stack(out)
