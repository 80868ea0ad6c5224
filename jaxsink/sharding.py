"""Sharding over a device mesh: logical axis rules applied to the NNX parameters and the cache.

jaxsink places nothing by hand. A `Mesh` has two axes, `data` (batch rows: independent
streams) and `model` (heads, kv heads, MLP width, experts, vocabulary), and `RULES` maps every
logical axis a weight or cache dimension carries (`jaxsink.traced.layers.LOGICAL_AXES`, plus `batch`)
onto one of them. The shardings built here go to `jax.jit` as in_shardings / out_shardings and
to `jax.make_array_from_callback` when loading; XLA inserts the collectives. A single device is
the 1 x 1 mesh, through the same code.

A dimension that does not divide its mesh axis (3 kv heads over model = 2) is replicated, as
other JAX engines do, and said in one line (`notes`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsink.config import ConfigError
from jaxsink.traced import cache as kv

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: never sharded)
RULES = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "experts": "model",
    "embed": None,
    "head_dim": None,
}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """How many devices along each mesh axis: `data` x `model`."""

    data: int = 1
    model: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """`data=D,model=M` (either may be left out: 1)."""
        sizes = {}
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
            if not m or m.group(1) not in MESH_AXES or m.group(1) in sizes:
                raise ConfigError(
                    f"--mesh {text!r}: expected data=D,model=M with positive integers"
                )
            sizes[m.group(1)] = int(m.group(2))
        spec = cls(**sizes)
        if spec.data < 1 or spec.model < 1:
            raise ConfigError(f"--mesh {text!r}: axis sizes must be >= 1")
        return spec

    @property
    def devices(self) -> int:
        return self.data * self.model


def make_mesh(spec: MeshSpec | str | None = None) -> Mesh:
    """A (data, model) mesh over the first data x model devices (all processes' devices, in
    `jax.devices()` order); None: the 1 x 1 mesh of the first device. Raises ConfigError when
    there are not enough devices."""
    if isinstance(spec, str):
        spec = MeshSpec.parse(spec)
    spec = spec or MeshSpec()
    devices = jax.devices()
    if spec.devices > len(devices):
        raise ConfigError(
            f"--mesh data={spec.data},model={spec.model} needs {spec.devices} devices, "
            f"this machine has {len(devices)} ({devices[0].platform}); use a smaller mesh"
        )
    grid = np.asarray(devices[: spec.devices], dtype=object).reshape(spec.data, spec.model)
    return Mesh(grid, MESH_AXES)


def partition(names, shape, mesh: Mesh, notes: set | None = None) -> P:
    """The PartitionSpec of a dimension list with logical `names`: each name's mesh axis, unless
    its size does not divide that axis (or an earlier dimension took the axis): replicated,
    with a line in `notes`."""
    used, out = set(), []
    for name, size in zip(names, shape, strict=True):
        axis = RULES.get(name) if name is not None else None
        if axis is None or mesh.shape[axis] == 1:
            out.append(None)
        elif axis in used or size % mesh.shape[axis]:
            if notes is not None and axis not in used:
                notes.add(
                    f"jaxsink: {name} ({size}) does not divide {axis}={mesh.shape[axis]}: "
                    "replicated"
                )
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return P(*out)


def weight_shardings(abstract: nnx.State, mesh: Mesh, notes: set | None = None) -> nnx.State:
    """A NamedSharding per weight of an abstract weights state (`layout.abstract`), from the
    logical axis names each `nnx.Param` carries. The parts of a quantized weight (codes,
    scales, minimums: `quant.QuantizedWeight`) carry the float weight's names and split at
    block bounds: a dimension is sharded only if its count of blocks divides the mesh axis, so
    that codes and their scales always split alike. A weight with one block per row (int8's
    per-channel scales) splits its codes along the last axis like the float weight, and keeps
    that row's scale on every device."""
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract)))
    flat = nnx.to_flat_state(jax.tree.map(lambda x: x, abstract))  # a copy, filled below
    for path, var in flat:
        shape = tuple(var.get_value().shape)
        names = tuple(specs[path].get_value())
        if stored := var.get_metadata().get("stored"):
            if stored.block == 1 and shape[-1] == 1:  # the scale of a one-block row
                names = (*names[:-1], None)
            elif shape[-1] != stored.block:  # the last axis counted in blocks
                shape = (*shape[:-1], shape[-1] // stored.block)
        var.set_value(NamedSharding(mesh, partition(names, shape, mesh, notes)))
    return nnx.from_flat_state(flat)


def cache_shardings(cache: kv.KVCache, mesh: Mesh, notes: set | None = None) -> kv.KVCache:
    """The cache's shardings (same pytree, of NamedShardings): batch rows over `data`, kv heads
    over `model`; keys [B, K, H, n] and values [B, K, n, H] alike, positions [B] and an
    evicting layer's per-slot ranks and scores [B, K] over `data`."""

    def one(x):
        names = (
            ("batch",) + (None,) * (x.ndim - 1) if x.ndim < 4 else ("batch", "kv_heads", None, None)
        )
        return NamedSharding(mesh, partition(names, x.shape, mesh, notes))

    return jax.tree.map(one, cache)


def rows(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batch-major arrays (tokens [B, C], logits [B, V], flags [B]): rows over `data`."""
    return NamedSharding(mesh, partition(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_cache(cfg, stream, batch: int, dtype, mesh: Mesh) -> kv.KVCache:
    """`cache.init_cache` made directly in its shardings (no device ever holds it whole)."""
    abstract = jax.eval_shape(lambda: kv.init_cache(cfg, stream, batch, dtype))
    shardings = cache_shardings(abstract, mesh)
    return jax.jit(lambda: kv.init_cache(cfg, stream, batch, dtype), out_shardings=shardings)()


def say(notes: set) -> None:
    """Print each replication note once per process, on process 0."""
    if jax.process_index() == 0:
        for line in sorted(notes - _SAID):
            print(line, file=sys.stderr)
    _SAID.update(notes)


_SAID: set = set()


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array's full value on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _cluster_processes(env) -> int:
    """How many processes a cluster that `jax.distributed.initialize` detects on its own
    announces (1: none)."""
    if hosts := env.get("TPU_WORKER_HOSTNAMES"):  # a Cloud TPU pod slice
        return len(hosts.split(","))
    for key in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 1


def init_distributed() -> bool:
    """Join a multi-process run when the environment describes one; returns whether it did.

    Either `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` (any machines), or a cluster `jax.distributed.initialize` detects itself
    (a Cloud TPU pod slice, SLURM, Open MPI) with more than one process. Nothing otherwise.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ConfigError(
                "JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                "to integers"
            ) from None
        _cpu_collectives()
        jax.distributed.initialize(num_processes=n, process_id=i)
        return True
    if _cluster_processes(env) > 1:
        _cpu_collectives()
        jax.distributed.initialize()
        return True
    return False


def _cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo (XLA:CPU's cross-process
    collectives); accelerators use their own and ignore this."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
