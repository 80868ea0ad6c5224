"""The roofline section: a 1B-class Llama shape (Llama 3.2 1B's) with random weights in the
run's dtype: B = 1 sink decode tok/s against the bandwidth bound, (weight + cache bytes read per
step) / the measured bandwidth, and aggregate decode at a larger batch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bounds import bandwidth
from benchmarks.harness import Harness, Net, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink import layout
from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary, StreamConfig
from jaxsink.traced import cache as kv

# Model shapes of the section, run with random weights (Llama 3.2 1B's shape; the quick run
# keeps its widths with 2 layers).
LLAMA_1B = {
    "architecture": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "num_layers": 16,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_embeddings": True,
}
ROOFLINE_SHAPES = {"llama-1b": LLAMA_1B, "llama-1b-shallow": {**LLAMA_1B, "num_layers": 2}}


def roofline_config(shape: dict) -> ModelConfig:
    """The Llama-style config of a `ROOFLINE_SHAPES` entry: every layer alike (grouped-query
    attention with rotary positions, a gated SiLU MLP, RMS norms)."""
    H, norm = shape["head_dim"], Norm("rms", shape["norm_eps"])
    attention = Attention(
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        head_dim=H,
        position=Rotary(shape["rope_theta"], H),
        query_scale=H**-0.5,
    )
    layer = LayerSpec(attention, Mlp(shape["intermediate_size"], "silu"), norm)
    return ModelConfig(
        architecture=shape["architecture"],
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        layers=(layer,) * shape["num_layers"],
        final_norm=norm,
        max_position_embeddings=shape["max_position_embeddings"],
        tie_embeddings=shape["tie_embeddings"],
    )


def random_net(cfg: ModelConfig, dtype, seed: int = 0) -> Net:
    """`cfg`'s network with random weights in `dtype`, made on device, each weight from its own
    key: normal weights (std 0.02), norm scales 1, biases 0."""

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def make(key, shape, kind):
        if kind == "scale":
            return jnp.ones(shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    graphdef, state = layout.abstract(cfg, dtype)  # shapes only: nothing allocated yet
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, var) in zip(keys, flat, strict=True):
        name = str(path[-1])  # e.g. "qkv", "scale" (a norm's), "out_bias"
        kind = "scale" if name == "scale" else "bias" if name.endswith("bias") else "normal"
        var.set_value(make(key, tuple(var.shape), kind))
    return Net(cfg, graphdef, nnx.from_flat_state(flat))


def run(h: Harness) -> dict:
    """The roofline section."""
    sz = h.sizes
    cfg = roofline_config(ROOFLINE_SHAPES[sz["roofline_shape"]])
    dtype = h.model.dtype
    net = random_net(cfg, dtype)
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    P, steps = sz["roofline_prompt"], sz["roofline_steps"]
    runs = h.decode_runs(net, stream, 1, P, steps)
    B, batch_steps = sz["roofline_batch"], sz["roofline_batch_steps"]
    batch_runs = h.decode_runs(net, stream, B, sz["batch_prompt"], batch_steps)
    # Bytes one decode step must read: every weight (the embedding table only as a tied LM
    # head: an untied one is read one row per token) and every cache slot (sink mode scores
    # the whole ring whatever its fill).
    weight_bytes = layout.param_bytes(net.weights)
    if not cfg.tie_embeddings:
        weight_bytes -= net.weights["embed"][...].nbytes
    cache_bytes = kv.cache_bytes(cfg, stream, 1, dtype)
    del net
    bw = bandwidth(sz["bandwidth_bytes"])
    step_bytes = weight_bytes + cache_bytes
    res = {
        "shape": sz["roofline_shape"],
        "model_config": cfg.to_dict(),
        "dtype": str(dtype),
        "prompt_tokens": P,
        "steps": steps,
        "runs_s": runs,
        "tok_s": steps / min(runs),
        "tok_s_median": steps / float(np.median(runs)),
        "weight_bytes_per_step": weight_bytes,
        "cache_bytes_per_step": cache_bytes,
        "bandwidth_bytes_per_s": bw["bandwidth_bytes_per_s"],
        "bound_tok_s": bw["bandwidth_bytes_per_s"] / step_bytes,
        "matvec_bound_tok_s": bw["bandwidth_matvec_bytes_per_s"] / step_bytes,
        "note": (
            "random weights (normal, std 0.02) in the run's dtype; B = 1 sink decode (S = 4, "
            f"W = 1020) after a {P}-token prompt, on-device greedy loop; bound = bandwidth "
            "(jnp.sum) / (weight + cache bytes per step)"
        ),
    }
    res["fraction_of_bound"] = res["tok_s"] / res["bound_tok_s"]
    res["batch"] = {
        "batch": B,
        "prompt_tokens": sz["batch_prompt"],
        "steps": batch_steps,
        "runs_s": batch_runs,
        "aggregate_tok_s": B * batch_steps / min(batch_runs),
    }
    res["batch"]["vs_batch1"] = res["batch"]["aggregate_tok_s"] / res["tok_s"]
    h.row(
        "roofline",
        f"{sz['roofline_shape']} shape ({step_bytes / 1e9:.2f} GB/step), B=1 decode, {dtype}",
        f"{res['tok_s']:.2f} tok/s",
        f"{res['fraction_of_bound']:.2f} of the bandwidth bound ({res['bound_tok_s']:.2f} "
        f"tok/s at {bw['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s)",
    )
    h.row(
        "roofline",
        f"{sz['roofline_shape']} shape, aggregate decode, B={B}",
        f"{res['batch']['aggregate_tok_s']:.2f} tok/s",
        f"{res['batch']['vs_batch1']:.2f}x of B=1; {weight_bytes / 1e9:.2f} GB of weights, "
        f"{B * cache_bytes / 1e9:.2f} GB of cache for {B} rows",
    )
    log(f"roofline: {res['tok_s']:.2f} tok/s, {res['fraction_of_bound']:.2f} of the bound")
    return res
