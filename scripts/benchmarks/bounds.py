"""The bounds section: a jitted pass over the model's weights alone (the matrix-vector products
of every layer and the LM head, no attention, layers unrolled like the model), and weight bytes
/ memory bandwidth (`bandwidth`, which the roofline section reuses)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from measure import seconds

from benchmarks.harness import Harness
from jaxsink import layout
from jaxsink.traced import decoder


def _matrices(block: decoder.Block) -> dict:
    """The weights of a block the pass multiplies by."""
    return {
        "qkv": block.attn.qkv[...],  # [K, G + 2, H, D]
        "out": block.attn.out[...],  # [D, N, H]
        "up": block.mlp.up[...],  # [2, F, D]: gate, then up
        "down": block.mlp.down[...],  # [D, F]
    }


def _layer(x, lp):
    """x: [D, B=1, C=1]; the model's matrix products, without attention."""
    G = lp["qkv"].shape[1] - 2
    qkv = jnp.einsum("kehd,dbc->kehbc", lp["qkv"], x)  # [K, G + 2, H, 1, 1]
    attn = qkv[:, :G].reshape(-1, 1, 1)
    o = jnp.einsum("dn,nbc->dbc", lp["out"].reshape(lp["out"].shape[0], -1), attn)
    gate_up = jnp.einsum("tfd,dbc->tfbc", lp["up"], x)  # [2, F, 1, 1]
    d = jnp.einsum("df,fbc->dbc", lp["down"], jax.nn.silu(gate_up[0]) * gate_up[1])
    y = x + o + d + qkv[:, G:].sum() * 1e-6
    return y * jax.lax.rsqrt(jnp.mean(y * y) + 1e-6), None  # keep values bounded


def _head(module: decoder.Decoder, x):
    logits = module.logits(x[:, 0, 0])  # [V]
    return module.embed[...][jnp.argmax(logits)][:, None, None]  # next input [D, 1, 1]


def _per_layer(weights, x, graphdef, steps):
    """`steps` tokens through every layer's products, one buffer per layer like the model."""
    module = nnx.merge(graphdef, weights)

    def one(_, x):
        for block in module.layers:
            x, _ = _layer(x, _matrices(block))
        return _head(module, x)

    return jax.lax.fori_loop(0, steps, one, x)


def _scanned(weights, stacked, x, graphdef, steps):
    """Diagnostic: the same products by a scan over weights stacked [L, ...]."""
    module = nnx.merge(graphdef, weights)

    def one(_, x):
        x, _ = jax.lax.scan(_layer, x, stacked)
        return _head(module, x)

    return jax.lax.fori_loop(0, steps, one, x)


def run(h: Harness) -> dict:
    """The bounds section."""
    net, sz = h.net, h.sizes
    res = {}
    steps = sz["bounds_steps"]
    weights, static = net.weights, {"graphdef": net.graphdef, "steps": steps}
    x0 = weights["embed"][...][:1].T[:, :, None]  # [D, 1, 1]
    f_list = (
        jax.jit(_per_layer, static_argnames=tuple(static)).lower(weights, x0, **static).compile()
    )
    blocks = nnx.merge(net.graphdef, weights).layers
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *map(_matrices, blocks))
    f_scan = (
        jax.jit(_scanned, static_argnames=tuple(static))
        .lower(weights, stacked, x0, **static)
        .compile()
    )
    jax.block_until_ready((f_scan(weights, stacked, x0), f_list(weights, x0)))
    t_scan, t_list = [], []
    for _ in range(h.repeats):
        t_scan.append(seconds(f_scan, weights, stacked, x0))
        t_list.append(seconds(f_list, weights, x0))
    del stacked, blocks
    weight_bytes = layout.param_bytes(weights)
    res["weight_bytes"] = weight_bytes
    res["weights_only_pass_tok_s"] = steps / min(t_list)
    res["weights_only_pass_stacked_scan_tok_s"] = steps / min(t_scan)
    res["weights_only_note"] = (
        "one token: the fused q/k/v, o, fused gate/up and down products of every layer "
        "(per-layer weight buffers, layers unrolled, as the model) + the LM head and the "
        f"next-token embedding lookup, {steps} steps in one jitted fori_loop; 'stacked scan' "
        "runs the same products with lax.scan over stacked [L, ...] weights as a diagnostic "
        "(XLA:CPU copies each layer's slice of a stacked weight before its product)"
    )

    res.update(bandwidth(sz["bandwidth_bytes"]))
    bw, bw_mv, n = (
        res["bandwidth_bytes_per_s"],
        res["bandwidth_matvec_bytes_per_s"],
        res["bandwidth_array_bytes"] // 4,
    )
    res.update(
        bandwidth_bound_tok_s=bw / weight_bytes,
        bandwidth_matvec_bound_tok_s=bw_mv / weight_bytes,
    )
    h.row(
        "bounds",
        "weights-only pass (per-layer buffers, like the model)",
        f"{res['weights_only_pass_tok_s']:.2f} tok/s",
        f"{weight_bytes / 1e6:.0f} MB of weights",
    )
    h.row(
        "bounds",
        "weights-only pass, lax.scan over stacked weights",
        f"{res['weights_only_pass_stacked_scan_tok_s']:.2f} tok/s",
        "diagnostic: XLA:CPU copies each stacked-weight slice",
    )
    h.row(
        "bounds",
        "memory bandwidth (jnp.sum)",
        f"{bw / 1e9:.2f} GB/s",
        f"{n * 4 / 2**30:.2f} GiB f32; matvec reads {bw_mv / 1e9:.2f} GB/s",
    )
    h.row(
        "bounds",
        "weight bytes / bandwidth",
        f"{res['bandwidth_bound_tok_s']:.2f} tok/s",
        f"with matvec bandwidth: {res['bandwidth_matvec_bound_tok_s']:.2f} tok/s",
    )
    return res


@functools.cache
def bandwidth(nbytes: int) -> dict:
    """Memory bandwidth (host RAM, or the accelerator's HBM): the best of several jitted
    reads of a float32 array of `nbytes`, by a plain reduction and by a matrix-vector product.
    Measured once per run (the bounds and roofline sections share it)."""
    n = nbytes // 4
    big = jax.block_until_ready(jnp.ones((n,), jnp.float32) * 1.5)
    f_sum = jax.jit(jnp.sum).lower(big).compile()
    side = int(np.sqrt(n))
    mat = big[: side * side].reshape(side, side)
    vec = jnp.ones((side,), jnp.float32)
    f_mv = jax.jit(lambda a, b: a @ b).lower(mat, vec).compile()
    jax.block_until_ready((f_sum(big), f_mv(mat, vec)))
    t_sum, t_mv = [], []
    for _ in range(10):
        t_sum.append(seconds(f_sum, big))
        t_mv.append(seconds(f_mv, mat, vec))
    return {
        "bandwidth_array_bytes": n * 4,
        "bandwidth_bytes_per_s": big.nbytes / min(t_sum),
        "bandwidth_matvec_bytes_per_s": mat.nbytes / min(t_mv),
        "bandwidth_note": (
            "bandwidth = bytes / best time of a jitted jnp.sum over the array (10 runs); "
            "'matvec' = the same bytes read by a jitted matrix-vector product (rows times a "
            "vector, the model's form; a diagnostic: XLA:CPU may run a plain reduction on "
            "fewer threads than a dot)"
        ),
    }
