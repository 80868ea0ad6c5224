"""An obviously-correct reference of SPEC.md, in float64 numpy, one token at a time.

Every token's keys and values are computed once, when the token is processed, and kept
un-rotated for the whole stream (nothing is ever evicted here). For each query the visible set and
the distances are recomputed from scratch with the SPEC formulas, and RoPE is applied at the
"cache order" positions: the query at L = min(t, K), each visible key at L - d(t, k).
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, pos, cfg):
    """x: [..., H] rotated at integer position `pos` (scalar), HF half-split layout."""
    inv = cfg.inv_freq().astype(np.float64)
    ang = pos * inv
    cos, sin = np.cos(ang), np.sin(ang)
    r = cfg.rotated_dim
    x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], axis=-1)


def spec_view(t: int, sinks: int, window: int, dense: bool = False):
    """Visible keys of query t and their distances d(t, k), straight from SPEC."""
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


def stream_logits(flat: dict, cfg, tokens, sinks: int, window: int, dense: bool = False):
    """Per-token logits [N, V] of a single stream under SPEC semantics (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    L, N, Kh, H = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // Kh
    keys = [[] for _ in range(L)]  # un-rotated, per layer, per token: [Kh, H]
    values = [[] for _ in range(L)]
    capacity = sinks + window
    out = []
    for t, tok in enumerate(tokens):
        x = p["embed"][tok]
        view = spec_view(t, sinks, window, dense)
        q_pos = t if dense else min(t, capacity)
        for layer in range(L):
            h = _rms(x, p["layers.attn_norm"][layer], cfg.norm_eps)
            q = np.einsum("d,nhd->nh", h, p["layers.wq"][layer])
            k = np.einsum("d,khd->kh", h, p["layers.wk"][layer])
            v = np.einsum("d,khd->kh", h, p["layers.wv"][layer])
            if cfg.qkv_bias:
                q, k, v = (
                    q + p["layers.bq"][layer],
                    k + p["layers.bk"][layer],
                    v + p["layers.bv"][layer],
                )
            keys[layer].append(k)
            values[layer].append(v)
            qr = _rope(q, q_pos, cfg) / np.sqrt(H)
            att = np.zeros((N, H))
            for n in range(N):
                kvh = n // G
                scores = np.array(
                    [qr[n] @ _rope(keys[layer][kk][kvh], q_pos - d, cfg) for kk, d in view]
                )
                w = np.exp(scores - scores.max())
                w /= w.sum()
                att[n] = sum(
                    wi * values[layer][kk][kvh] for wi, (kk, _) in zip(w, view, strict=True)
                )
            x = x + np.einsum("nh,dnh->d", att, p["layers.wo"][layer])
            h = _rms(x, p["layers.mlp_norm"][layer], cfg.norm_eps)
            gate = p["layers.w_gate"][layer] @ h
            up = p["layers.w_up"][layer] @ h
            x = x + p["layers.w_down"][layer] @ ((gate / (1 + np.exp(-gate))) * up)
        x = _rms(x, p["final_norm"], cfg.norm_eps)
        head = p["embed"] if cfg.tie_embeddings else p["lm_head"]
        out.append(head @ x)
    return np.stack(out)
