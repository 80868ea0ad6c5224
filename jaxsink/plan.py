"""`jaxsink plan`: what a model, a batch of streams and a mesh need per device, and whether the
prefill and decode steps lower for an accelerator, without allocating anything.

Shapes come from `jax.eval_shape` of the module and the cache; shardings from the logical axis
rules (`jaxsink.sharding`), evaluated on the mesh's sizes alone, so the figures need no devices.
With `lower`, the real entry points are exported with `jax.export` for the platform over a mesh of
this machine's devices (force host devices on a CPU-only machine), abstract arguments only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsink import layout
from jaxsink import sharding as sh
from jaxsink.config import CACHE_DTYPES, DTYPES, ConfigError, ModelConfig, StreamConfig
from jaxsink.memory import host_memory
from jaxsink.traced import cache as kv
from jaxsink.traced import entry

CONFIGS = Path(__file__).parent / "configs"  # bundled Hugging Face config.json files
# Device memory assumed without --device-memory (GPU: an H100's 80 GiB; TPU: a v5e chip's 16).
DEFAULT_MEMORY = {"cuda": 80 * 2**30, "tpu": 16 * 2**30}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def bundled() -> list[str]:
    """Names of the bundled configs (`llama-2-7b`, ...)."""
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def read_model_config(spec: str) -> ModelConfig:
    """A bundled name, a jaxsink checkpoint folder, a Hugging Face folder or a config.json."""
    from jaxsink.checkpoint import read_config
    from jaxsink.convert.families import config_from_hf
    from jaxsink.convert.hf import read_json

    path = Path(spec).expanduser()
    if not path.exists() and spec in bundled():
        path = CONFIGS / f"{spec}.json"
    if path.is_dir():
        if (path / "config.json").is_file() and "jaxsink" in (path / "config.json").read_text():
            return read_config(path)[0]
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model {spec!r} not found: give a checkpoint, a Hugging Face folder or config.json, "
            f"or one of {', '.join(bundled())}"
        )
    return config_from_hf(read_json(path))


def parse_bytes(text: str) -> int:
    """`80GiB`, `16 GB`, `1e9` -> bytes."""
    import re

    m = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GiB or 16GB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def _sizes(mesh: sh.MeshSpec):
    """A stand-in for a Mesh that `sharding.partition` reads (axis sizes only)."""
    return types.SimpleNamespace(shape={"data": mesh.data, "model": mesh.model})


def _per_device(shape, names, itemsize: int, sizes, notes=None) -> int:
    """Bytes one device holds of an array of `shape` whose dimensions carry logical `names`."""
    spec = sh.partition(tuple(names), tuple(shape), sizes, notes)
    parts = math.prod(sizes.shape[a] for a in spec if a is not None)
    return math.prod(shape) * itemsize // parts


def params_bytes(cfg: ModelConfig, dtype, sizes, notes=None) -> int:
    """Weight bytes per device."""
    _, abstract = layout.abstract(cfg, dtype)
    names = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract)))
    return sum(
        _per_device(v.shape, names[k].get_value(), v.dtype.itemsize, sizes, notes)
        for k, v in nnx.to_flat_state(abstract)
    )


def cache_bytes(
    cfg: ModelConfig, stream: StreamConfig, batch: int, dtype, sizes, notes=None
) -> int:
    """Cache bytes per device (keys and values; batch rows over data, kv heads over model)."""
    abstract = jax.eval_shape(lambda: kv.init_cache(cfg, stream, batch, dtype))
    total = 0
    for x in jax.tree.leaves(abstract):
        names = ("batch",) if x.ndim == 1 else ("batch", "kv_heads", None, None)
        total += _per_device(x.shape, names, x.dtype.itemsize, sizes, notes)
    return total


def activation_bytes(
    cfg: ModelConfig, stream: StreamConfig, batch: int, chunk: int, dtype, sizes
) -> int:
    """An estimate of the largest working set of one step per device: the chunk's residual
    stream and norm output, one layer's q/k/v, its float32 scores against the largest cache
    block plus the chunk, its MLP hidden (every expert's, for a mixture), and the float32 logits
    of the chunk. The largest over layers; a step of C = `chunk` tokens for `batch` rows."""
    it = jnp.dtype(dtype).itemsize
    B = -(-batch // sizes.shape["data"]) if batch % sizes.shape["data"] == 0 else batch
    M = sizes.shape["model"]

    def split(n):  # a dimension over `model` where it divides (the rules' replication)
        return n // M if n % M == 0 else n

    blocks = max(n for _, n in kv.slot_blocks(stream))
    worst = 0
    for spec in cfg.layers:
        a, m = spec.attention, spec.mlp
        K, G, H = split(a.num_kv_heads), a.group, a.head_dim
        T = min(blocks, a.sliding_window or blocks) + chunk
        E = m.experts.num if m.experts is not None else 1
        F = E * m.size // M if (E % M == 0 and E > 1) or m.size % M == 0 else E * m.size
        hidden = 2 * cfg.hidden_size * B * chunk * it
        qkv = K * (G + 2) * H * B * chunk * it
        scores = B * K * chunk * G * T * 4
        mlp = (2 if m.gated else 1) * F * B * chunk * it
        worst = max(worst, hidden + qkv + scores + mlp)
    logits = split(cfg.vocab_size) * B * chunk * 4
    return worst + logits


@dataclasses.dataclass
class Plan:
    """Per-device figures of a (model, batch, stream, mesh, dtype) and the platforms lowered."""

    params_bytes_per_device: int
    cache_bytes_per_device: int
    activation_bytes_per_device: int
    total_bytes_per_device: int
    max_batch: int
    device_memory: int
    lowered: list
    lowered_bytes: dict
    notes: list

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(
    cfg: ModelConfig,
    batch: int,
    stream: StreamConfig,
    mesh: sh.MeshSpec,
    dtype: str = "bfloat16",
    cache_dtype: str | None = None,
    device_memory: int | None = None,
    platform: str = "cpu",
    chunk: int = 256,
    lower: bool = False,
) -> Plan:
    """The memory plan, and with `lower` the exported prefill and decode steps' sizes."""
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    wdt, cdt = jnp.dtype(DTYPES[dtype]), jnp.dtype(CACHE_DTYPES[cache_dtype or dtype])
    sizes = _sizes(mesh)
    notes: set = set()
    params = params_bytes(cfg, wdt, sizes, notes)
    cache_one = cache_bytes(cfg, stream, mesh.data, cdt, sizes, notes)  # a row per data shard
    act_one = max(
        activation_bytes(cfg, stream, mesh.data, c, wdt, sizes) for c in (1, min(chunk, 4096))
    )
    rows = -(-batch // mesh.data)
    cache = cache_one * rows
    act = act_one * rows
    memory = device_memory or DEFAULT_MEMORY.get(platform) or host_memory()
    per_row = cache_one + act_one
    max_batch = max(0, (memory - params) // per_row) * mesh.data if per_row else 0
    lowered, lowered_bytes = [], {}
    if lower:
        lowered_bytes = lower_steps(cfg, batch, stream, mesh, wdt, cdt, platform, chunk)
        lowered = [platform]
    return Plan(
        params_bytes_per_device=params,
        cache_bytes_per_device=cache,
        activation_bytes_per_device=act,
        total_bytes_per_device=params + cache + act,
        max_batch=int(max_batch),
        device_memory=int(memory),
        lowered=lowered,
        lowered_bytes=lowered_bytes,
        notes=sorted(notes),
    )


def lower_steps(cfg, batch, stream, mesh_spec, wdt, cdt, platform, chunk) -> dict:
    """Export the prefill chunk (`entry.last_logits`), the decode loop
    (`rows.decode_rows`) and the server's mixed step (`rows.mixed_rows`) for `platform` with the mesh's shardings, from abstract arguments;
    returns each serialized module's size in bytes. ConfigError when one does not lower."""
    from jaxsink.engine import decode_rows_shardings, mixed_rows_shardings
    from jaxsink.traced.rows import Rows, decode_rows, mixed_rows

    mesh = sh.make_mesh(mesh_spec)
    graphdef, abstract = layout.abstract(cfg, wdt)
    w_sh = sh.weight_shardings(abstract, mesh)
    weights = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract, w_sh
    )
    cache = jax.eval_shape(lambda: kv.init_cache(cfg, stream, batch, cdt))
    c_sh = sh.cache_shardings(cache, mesh)
    cache = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), cache, c_sh
    )

    def arg(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    row, one = sh.rows(mesh, (batch, chunk)), sh.replicated(mesh)
    logits_rows = sh.rows(mesh, (batch, cfg.vocab_size))
    tokens = arg((batch, chunk), jnp.int32, row)
    prefill = (
        entry.last_logits.with_shardings((w_sh, c_sh, row, row), (logits_rows, c_sh)),
        (weights, cache, tokens, arg((batch, chunk), jnp.bool_, row), graphdef),
    )
    block = 16
    key = jax.eval_shape(lambda: jax.random.key(0))
    idle = Rows.idle(batch, cfg.vocab_size, jax.ShapeDtypeStruct((batch, *key.shape), key.dtype))
    ins, outs = decode_rows_shardings(mesh, batch, batch, block, cfg.vocab_size, w_sh, c_sh)
    rows = jax.tree.map(lambda x, s: arg(x.shape, x.dtype, s), idle, ins[2])
    eos = arg((max(len(cfg.eos_token_ids), 1),), jnp.int32, one)
    decode = (
        decode_rows.with_shardings(ins, outs),
        (weights, cache, rows, arg((batch,), jnp.int32, one), eos, graphdef, block),
    )
    # the server's mixed step: every row's decode step beside one row's prefill chunk
    ins, outs = mixed_rows_shardings(mesh, batch, cfg.vocab_size, w_sh, c_sh)
    fed = (arg((1,), jnp.int32, one), arg((1, chunk), jnp.int32, one))
    mixed = (
        mixed_rows.with_shardings(ins, outs),
        (weights, cache, rows, *fed, arg((1, chunk), jnp.bool_, one), eos, graphdef),
    )
    sizes = {}
    for name, (fn, args) in (("prefill", prefill), ("decode", decode), ("mixed", mixed)):
        try:
            exported = jax.export.export(fn, platforms=(platform,))(*args)
        except Exception as e:  # any lowering failure is the user's answer, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"the {name} step does not lower for {platform}: {first}") from None
        sizes[name] = len(exported.mlir_module_serialized)
    return sizes


def report_lines(p: Plan, cfg: ModelConfig, mesh: sh.MeshSpec) -> list[str]:
    """The human-readable plan."""

    def gib(n):
        return f"{n / 2**30:.2f} GiB"

    lines = [
        f"{cfg.architecture}: {cfg.num_layers} layers, mesh data={mesh.data},model={mesh.model}",
        f"params per device      {gib(p.params_bytes_per_device)}",
        f"cache per device       {gib(p.cache_bytes_per_device)}",
        f"activations per device {gib(p.activation_bytes_per_device)} (estimate)",
        f"total per device       {gib(p.total_bytes_per_device)} of {gib(p.device_memory)}",
        f"largest batch that fits: {p.max_batch}",
    ]
    for name, size in p.lowered_bytes.items():
        lines.append(f"{name} step lowered for {p.lowered[0]}: {size / 1e6:.2f} MB of StableHLO")
    return lines + [f"note: {n}" for n in p.notes]


def to_json(p: Plan) -> str:
    return json.dumps(p.as_dict(), default=lambda x: np.asarray(x).tolist())
