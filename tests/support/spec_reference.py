"""An obviously-correct reference of the streaming contract (docs/streaming-contract.md), in
float64 numpy, one token at a time, for any model the per-layer description covers.

It reads the same `ModelConfig` (one `LayerSpec` per layer) and the same flat checkpoint arrays
as jaxsink, but nothing else of it: every token's keys and values are computed once, when the
token is processed, and kept un-rotated for the whole stream (nothing is ever evicted here). For
each query the visible set and the distances d(t, k) are recomputed from scratch with the
contract's formulas; RoPE is applied at the "cache order" positions (the query at L = min(t, K),
each visible key at L - d(t, k)) and ALiBi adds -slope * d(t, k). A native sliding-window
layer of w sees the keys t - w < k <= t at their true distances (its query at min(t, w - 1)).

With `policy` tova or h2o it is the contract of a cache that evicts by attention
(`jaxsink.traced.policy`, docs/streaming-contract.md): each full layer keeps its own list of
cached tokens (the sinks, then up to W others in stream order); a query sees them and itself,
the cached ones at their rank in that list and itself at the list's length; then it enters
the list and, past K, the policy's victim leaves (tova: least attention from this query, mean
over heads; h2o: least attention summed since entering, among all but the `recent` latest;
ties: the oldest).

With `int8=True` it is the contract of an int8 cache: every ring token's key (rotated by its
ring offset (k - S) mod W, its layer's own S and W) and value are stored quantized per kv head
(`int8_round_trip`), a query sees them so, its own included; sinks stay exact.
"""

from __future__ import annotations

import math

import numpy as np

from jaxsink.config import Alibi, ModelConfig, Norm, Rotary


def _norm(x, spec: Norm, w, b=None, axes=(-1,)):
    """x [..., F] normalized over `axes` (default its last) as `spec` says."""
    if spec.kind == "layer":
        x = x - x.mean(axis=axes, keepdims=True)
    x = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + spec.eps)
    x = x * (1 + w) if spec.kind == "rms_plus_one" else x * w
    return x if b is None else x + b


def _act(name, x):
    if name in ("silu", "clamped_swiglu"):
        return x / (1 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(
            x.shape
        )
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # tanh forms


def _rope(x, pos, spec: Rotary, span: int):
    """x [..., H] rotated at integer position `pos` in the spec's layout, its rotated part
    scaled by the scaling's cos/sin factor; span: the in-cache positions (longrope)."""
    ang = pos * spec.inv_freq(span).astype(np.float64)
    cos, sin = np.cos(ang) * spec.cos_sin_scale(), np.sin(ang) * spec.cos_sin_scale()
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


def int8_round_trip(x):
    """x [..., H] quantized per row as an int8 cache stores it and read back: scale = max|x| /
    127, codes = round(x / scale) (ties to even) in [-127, 127], value = codes * scale."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(x / safe), -127, 127) * scale


def _int8_key(k, offset: int, spec: Rotary | None, span: int):
    """The un-rotated key [Kh, H] an int8 cache's ring slot gives back: rotated by the slot's
    ring offset, quantized, rotated back (the rotation's cos/sin factor, applied once by the
    cache, undone)."""
    if spec is None:
        return int8_round_trip(k)
    back = _rope(int8_round_trip(_rope(k, offset, spec, span)), -offset, spec, span)
    back[..., : spec.dim] /= spec.cos_sin_scale() ** 2
    return back


def spec_view(t: int, sinks: int, window: int, dense: bool = False, native: int | None = None):
    """Visible keys of query t and their distances d(t, k), straight from the contract (for a
    full layer, or a native sliding-window layer of `native` tokens)."""
    if native is not None:
        return [(k, t - k) for k in range(max(t - native + 1, 0), t + 1)]
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


def _evict(cached: list, value: dict, policy: str, sinks: int, capacity: int, recent: int):
    """Past `capacity`, the policy's victim leaves `cached`: the token of least `value` (tova:
    this query's weights; h2o: the weights received so far) among the non-sinks (h2o: but the
    `recent` latest), the oldest of ties."""
    if len(cached) <= capacity:
        return
    kept = set(cached[-recent:]) if policy == "h2o" else set()
    candidates = [kk for kk in cached if kk >= sinks and kk not in kept]
    cached.remove(min(candidates, key=lambda kk: (value[kk], kk)))


def _gated(m, gate, up):
    if m.activation == "clamped_swiglu":
        gate, up = np.minimum(gate, m.limit), np.clip(up, -m.limit, m.limit)
        return gate / (1 + np.exp(-m.alpha * gate)) * (up + 1)
    return _act(m.activation, gate) * up


def _mlp(m, lp, h, prefix="mlp."):
    """One dense MLP (or expert: its weights already picked) on h [D]."""
    up = np.einsum("...fd,d->...f", lp[prefix + "up"], h)
    if m.bias:
        up = up + lp[prefix + "up_bias"]
    act = _gated(m, up[0], up[1]) if m.gated else _act(m.activation, up)
    y = lp[prefix + "down"] @ act
    return y + lp[prefix + "down_bias"] if m.bias else y


def _moe(m, lp, h):
    """The mixture: softmax over the router's logits, the top-k experts, their outputs weighted
    by those probabilities (renormalized if the config says so)."""
    logits = lp["mlp.router"] @ h
    if m.experts.router_bias:
        logits = logits + lp["mlp.router_bias"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[: m.experts.top_k]
    weights = probs[top] / probs[top].sum() if m.experts.normalize else probs[top]
    out = 0.0
    for e, w in zip(top, weights, strict=True):
        expert = {k: v[e] for k, v in lp.items() if k.startswith("mlp.") and k != "mlp.router"}
        out = out + w * _mlp(m, expert, h)
    return out


def stream_logits(
    flat: dict,
    cfg: ModelConfig,
    tokens,
    sinks: int,
    window: int,
    dense: bool = False,
    int8: bool = False,
    policy: str = "sink",
    recent: int = 0,
):
    """Per-token logits [N, V] of a single stream under the contract (float64); int8: of an
    int8 cache; policy, recent: eviction by attention (module docstring)."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    L = cfg.num_layers
    keys = [[] for _ in range(L)]  # un-rotated, per layer, per token: [Kh, H]
    values = [[] for _ in range(L)]
    capacity = sinks + window
    full_span = len(tokens) if dense else capacity + 1  # in-cache positions (longrope)
    cached = [[] for _ in range(L)]  # under a policy: each layer's cached tokens, stream order
    received = [{} for _ in range(L)]  # under h2o: attention each cached token has received
    out = []
    for t, tok in enumerate(tokens):
        x = p["embed"][tok] * cfg.embed_scale
        if cfg.embed_norm is not None:
            x = _norm(x, cfg.embed_norm, p["embed_norm.scale"], p.get("embed_norm.bias"))
        for i, spec in enumerate(cfg.layers):
            lp = {k.removeprefix(f"layers.{i}."): v for k, v in p.items()}
            a = spec.attention
            G = a.group
            w = a.sliding_window
            view = spec_view(t, sinks, window, dense, native=w)
            evicting = policy != "sink" and w is None
            if evicting:  # the cached tokens at their ranks, the query at their count
                n = len(cached[i])
                view = [(kk, n - r) for r, kk in enumerate(cached[i])] + [(t, 0)]
            if w is None:
                q_pos, span = (t if dense else min(t, capacity)), full_span
            else:
                q_pos, span = min(t, w - 1), w
            pre = spec.norms in ("pre", "pre_post")
            h = _norm(x, spec.norm, lp["norm.scale"], lp.get("norm.bias")) if pre else x
            qkv = np.einsum("d,kehd->keh", h, lp["attn.qkv"])  # [K, G + 2, H]
            if a.qkv_bias:
                qkv = qkv + lp["attn.qkv_bias"]
            if a.clip_qkv is not None:
                qkv = np.clip(qkv, -a.clip_qkv, a.clip_qkv)
            q = qkv[:, :G].reshape(a.num_heads, a.head_dim)
            k, v = qkv[:, G], qkv[:, G + 1]
            if a.qk_norm is not None:
                axes = (-2, -1) if a.qk_norm_scope == "all" else (-1,)
                q = _norm(q, a.qk_norm, lp["attn.q_norm.scale"], lp.get("attn.q_norm.bias"), axes)
                k = _norm(k, a.qk_norm, lp["attn.k_norm.scale"], lp.get("attn.k_norm.bias"), axes)
            if int8:  # the layer's own ring (S, W); a dense cache never wraps
                S, W = (
                    (sinks, window) if w is None and not dense else (0, w - 1 if w else len(tokens))
                )
                if t >= S:
                    rotary = a.position if isinstance(a.position, Rotary) else None
                    k, v = _int8_key(k, (t - S) % W, rotary, span), int8_round_trip(v)
            keys[i].append(k)
            values[i].append(v)
            att = np.zeros((a.num_heads, a.head_dim))
            heads_weights = []
            rotary = a.position if isinstance(a.position, Rotary) else None
            for n in range(a.num_heads):
                kvh = n // G
                qn = q[n] if rotary is None else _rope(q[n], q_pos, rotary, span)
                scores = []
                for kk, d in view:
                    key = keys[i][kk][kvh]
                    if rotary is not None:
                        key = _rope(key, q_pos - d, rotary, span)
                    s = a.query_scale * (qn @ key)
                    if a.softcap is not None:
                        s = a.softcap * np.tanh(s / a.softcap)
                    if isinstance(a.position, Alibi):
                        s -= a.position.slopes[n] * d
                    scores.append(s)
                scores = np.array(scores)
                top = scores.max()
                if a.learned_sinks:
                    top = max(top, lp["attn.sinks"][n])
                wts = np.exp(scores - top)
                total = wts.sum() + (np.exp(lp["attn.sinks"][n] - top) if a.learned_sinks else 0)
                wts /= total
                heads_weights.append(wts)
                att[n] = sum(wi * values[i][kk][kvh] for wi, (kk, _) in zip(wts, view, strict=True))
            if evicting:  # t joins the cached tokens, then the policy's victim leaves
                weights = dict(zip((kk for kk, _ in view), np.mean(heads_weights, 0), strict=True))
                for kk, wk in weights.items():
                    received[i][kk] = received[i].get(kk, 0.0) + wk
                cached[i].append(t)
                value = weights if policy == "tova" else received[i]
                _evict(cached[i], value, policy, sinks, capacity, recent)
            attn = np.einsum("nh,dnh->d", att, lp["attn.out"])
            if a.out_bias:
                attn = attn + lp["attn.out_bias"]

            def mlp(hm, lp=lp, m=spec.mlp):
                return _mlp(m, lp, hm) if m.experts is None else _moe(m, lp, hm)

            def post(name, y, lp=lp, spec=spec):
                if spec.norms == "pre":
                    return y
                return _norm(y, spec.norm, lp[f"{name}.scale"], lp.get(f"{name}.bias"))

            if spec.residual == "sequential":
                x = x + post("post_attn_norm", attn)
                hm = (
                    _norm(x, spec.norm, lp["mlp_norm.scale"], lp.get("mlp_norm.bias")) if pre else x
                )
                x = x + post("post_mlp_norm", mlp(hm))
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
        logits = logits * cfg.logit_scale
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
        out.append(logits)
    return np.stack(out)
