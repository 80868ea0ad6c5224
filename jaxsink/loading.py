"""`jaxsink.load`: a checkpoint folder (or anything `resolve_model` converts) -> a ready Model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxsink import config as C
from jaxsink import layout
from jaxsink import sharding as sh
from jaxsink.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    check_params,
    param_shapes,
    read_config,
)
from jaxsink.config import DTYPES, ConfigError, ModelConfig
from jaxsink.quantize import QUANTIZE_KINDS, quantize_blocks, quantized_config
from jaxsink.tensorfile import TensorFile
from jaxsink.tokenizer import Tokenizer
from jaxsink.traced import decoder


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config, the network as NNX (graph definition + weights state on
    device), tokenizer.

    `module` is the `nnx.Module` itself (`jaxsink.traced.decoder.Decoder`); `graphdef` and `weights`
    are its `nnx.split`, what the jitted entry points take (`weights` as an argument,
    `graphdef` static). `mesh`: the devices the weights are sharded over (`jaxsink.sharding`;
    one device is the 1 x 1 mesh) and that every run of the model uses.
    """

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    weights: nnx.State
    tokenizer: Tokenizer
    path: Path
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.mesh is None:  # a model built by hand runs on one device
            object.__setattr__(self, "mesh", sh.make_mesh())

    def on_mesh(self, mesh: Mesh | sh.MeshSpec | str | None) -> Model:
        """This model with its weights resharded onto `mesh` (itself for None or its own)."""
        if mesh is None or mesh is self.mesh:
            return self
        mesh = mesh if isinstance(mesh, Mesh) else sh.make_mesh(mesh)
        if mesh == self.mesh:
            return self
        notes: set = set()
        shardings = sh.weight_shardings(layout.abstract(self.cfg, self.dtype)[1], mesh, notes)
        sh.say(notes)
        weights = jax.device_put(self.weights, shardings)
        return dataclasses.replace(self, weights=weights, mesh=mesh)

    @property
    def weight_shardings(self) -> nnx.State:
        """A NamedSharding per weight (the weights' own)."""
        return jax.tree.map(lambda x: x.sharding, self.weights)

    @property
    def module(self) -> decoder.Decoder:
        return nnx.merge(self.graphdef, self.weights)

    @property
    def dtype(self):
        """The float dtype the model runs in (quantized weights keep their codes)."""
        return self.weights["final_norm"]["scale"][...].dtype


def load(
    spec: str | os.PathLike | None = None,
    dtype: str | None = None,
    mesh: Mesh | sh.MeshSpec | str | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> Model:
    """Load a model.

    spec: a jaxsink checkpoint folder; or a Hugging Face folder, a `.gguf` file or a hub id,
    converted once and cached (see `jaxsink.default_model.resolve_model`); None = the default
    SmolLM2-135M-Instruct, fetched and converted on first use.
    dtype: "float32" or "bfloat16" at run time (default: the checkpoint's dtype).
    mesh: a `Mesh` with axes (data, model), a `MeshSpec`, "data=D,model=M", or None (one
    device). Each weight is read from the checkpoint straight into its shards.
    progress: say on stderr what is fetched, converted or waited for.
    quantize: "keep": a `.gguf` spec (or the default model) is converted with its Q8_0, Q4_0
    and Q4_1 weights kept quantized (`jaxsink.traced.quant`), into its own cached folder. "int8" /
    "int4": the model's matrices are quantized (`quantize.weight_plan`): a source that needs
    converting is converted that way into its own cached folder; a float jaxsink checkpoint is
    quantized as it is read, one weight at a time (`quantized_on_load`).
    """
    from jaxsink.default_model import resolve_model

    spec = None if spec is None else str(spec)
    path = resolve_model(spec, progress=progress, quantize=quantize)
    cfg, meta = read_config(path)
    dtype = dtype or meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    cfg = quantized_on_load(cfg, quantize, dtype)
    mesh = mesh if isinstance(mesh, Mesh) else sh.make_mesh(mesh)
    target = jnp.dtype(DTYPES[dtype])
    graphdef, abstract = layout.abstract(cfg, target)
    notes: set = set()
    shardings = sh.weight_shardings(abstract, mesh, notes)
    sh.say(notes)
    weights = jax.block_until_ready(read_sharded(Path(path), cfg, abstract, shardings))
    return Model(
        cfg=cfg,
        graphdef=graphdef,
        weights=weights,
        tokenizer=Tokenizer(path, cfg.eos_token_ids),
        path=Path(path),
        mesh=mesh,
    )


def read_sharded(path: Path, cfg: ModelConfig, abstract: nnx.State, shardings) -> nnx.State:
    """The weights of checkpoint folder `path`, each read from its safetensors file straight
    into its shardings: every device's shard is read (only its rows, when the shard splits the
    first dimension) and cast on its own, so the host holds about one tensor at a time, never
    the whole model; a process of many reads only the shards its devices address. abstract /
    shardings: the weights state of `layout.abstract` and a NamedSharding per weight
    (`sharding.weight_shardings`)."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    flat = nnx.to_flat_state(abstract)
    placement = dict(nnx.to_flat_state(shardings))
    single = all(s.get_value().mesh.size == 1 for _, s in placement.items())
    with TensorFile(weights) as file:
        f = _Quantizing(file, cfg) if cfg.quantized and not _stores_quantized(file) else file
        check_params(cfg, {n: _Shape(f.shape(n), f.dtype(n)) for n in f.names()})
        for key, var in flat:
            name, dtype = layout.name_of(key), var.get_value().dtype
            stored = var.get_metadata().get("stored")  # a part of a quantized weight

            def shard(index, name=name, dtype=dtype, var=var, stored=stored):
                index = index if stored is None else stored.index(tuple(index))
                return layout.from_stored(var, f.read(name, index), dtype)

            if single:  # uncommitted, as the caches `init_cache` makes: one jit signature
                value = jax.device_put(shard(()))
            else:
                value = jax.make_array_from_callback(
                    var.get_value().shape, placement[key].get_value(), shard
                )
            var.set_value(value)
    return nnx.from_flat_state(flat)


@dataclasses.dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: object


def quantized_on_load(cfg: ModelConfig, quantize: str | None, dtype: str) -> ModelConfig:
    """The config a checkpoint of `cfg` loads as under `quantize`: a float checkpoint with
    `int8` / `int4` has its matrices quantized as it is read (`_Quantizing`); any other is
    read as it is (`resolve_model` refuses `--quantize` for a checkpoint already quantized)."""
    if quantize not in QUANTIZE_KINDS or cfg.quantized:
        return cfg
    return quantized_config(cfg, quantize, dtype)


def _stores_quantized(f: TensorFile) -> bool:
    return any(n.endswith(".codes") for n in f.names())


class _Quantizing:
    """A float checkpoint's `TensorFile` read as the checkpoint of its quantized config `cfg`:
    the parts of each weight `cfg` quantizes (`X.codes`, `X.scales`) come from quantizing the
    float `X` when first read (`quantize.quantize_blocks`), in their checkpoint form; the one
    weight last quantized is kept while its parts and shards are read."""

    def __init__(self, f: TensorFile, cfg: ModelConfig):
        self._f = f
        self._made = C.quantized_weights(cfg)
        self._layout = layout.checkpoint_layout(cfg)
        self._float = param_shapes(cfg.dequantized())
        self._last: tuple[str, dict] | None = None

    def _part(self, name: str) -> tuple[str, str] | None:
        weight, _, part = name.rpartition(".")
        return (weight, part) if weight in self._made else None

    def names(self) -> list[str]:
        stored = set(self._f.names())
        parts = [n for n in self._layout if self._part(n) and self._part(n)[0] in stored]
        return [n for n in stored if n not in self._made] + parts

    def shape(self, name: str) -> tuple[int, ...]:
        if self._part(name) is None:
            return self._f.shape(name)
        weight = self._part(name)[0]
        if tuple(self._f.shape(weight)) != self._float[weight]:  # check_params names the part
            return tuple(self._f.shape(weight))
        return self._layout[name][0]

    def dtype(self, name: str):
        return self._f.dtype(name) if self._part(name) is None else self._layout[name][1]

    def read(self, name: str, index: tuple = ()):
        found = self._part(name)
        if found is None:
            return self._f.read(name, index)
        weight, part = found
        if self._last is None or self._last[0] != weight:
            blocks = quantize_blocks(self._f.read(weight), self._made[weight])
            self._last = (weight, blocks.stored())
        return self._last[1][part][tuple(index)]
