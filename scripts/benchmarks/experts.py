"""The experts section: a mixture-of-experts MLP's two exact paths, chosen experts' weights
gathered per token or every expert on every token, against the tokens per call (Mixtral- and
gpt-oss-like expert counts at a CPU-sized width)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from measure import seconds

from benchmarks.harness import Harness
from jaxsink.config import Experts, Mlp
from jaxsink.traced import layers

D = 1024  # the hidden width
SHAPES = {"mixtral-like E=8 k=2": (8, 2, 1792), "gpt-oss-like E=32 k=4": (32, 4, 1024)}
PATHS = ("experts_gathered", "experts_all")


def run(h: Harness) -> dict:
    """The experts section."""
    sz = h.sizes
    res = {"hidden": D, "dtype": "float32", "shapes": {}}
    for name, (E, k, F) in SHAPES.items():
        spec = Mlp(F, "silu", experts=Experts(E, k))
        mlp = layers.Mlp(spec, D, jnp.float32)
        rng = np.random.default_rng(0)
        for _, var in nnx.to_flat_state(nnx.state(mlp, nnx.Param)):
            var.set_value(jnp.asarray(0.02 * rng.standard_normal(var.shape), jnp.float32))
        graphdef, state = nnx.split(mlp)
        rows = []
        for T in sz["experts_tokens"]:
            h_in = jnp.asarray(rng.standard_normal((D, 1, T)), jnp.float32)
            times = {}
            for path in PATHS:

                @jax.jit
                def call(state, x, path=path, graphdef=graphdef):
                    m = nnx.merge(graphdef, state)
                    return getattr(m, path)(x, *m.route(x))

                call(state, h_in).block_until_ready()
                times[path] = min(seconds(call, state, h_in) for _ in range(sz["experts_repeats"]))
            chosen = "experts_gathered" if T * k < E else "experts_all"
            faster = min(times, key=times.get)
            rows.append(
                {
                    "tokens": T,
                    "gathered_ms": times["experts_gathered"] * 1e3,
                    "all_ms": times["experts_all"] * 1e3,
                    "model_chooses": chosen,
                    "faster": faster,
                }
            )
            h.row(
                "experts",
                f"{name}, {T} token(s): gathered / all experts",
                f"{times['experts_gathered'] * 1e3:.2f} / {times['experts_all'] * 1e3:.2f} ms",
                f"model uses {chosen.removeprefix('experts_')}; faster: "
                f"{faster.removeprefix('experts_')}",
            )
        res["shapes"][name] = {"experts": E, "top_k": k, "mlp": F, "runs": rows}
    res["note"] = (
        "one MoE MLP (router, top-k, experts, weighted sum) jitted alone on random float32 "
        "weights, best of repeats; both paths compute the same sums"
    )
    return res
