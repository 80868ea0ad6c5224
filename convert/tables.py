"""Declarative name tables: source tensors -> jaxsink parameter -> named layout transform.

A `Table` says, for one architecture, which Hugging Face tensors fill which jaxsink parameter
(the names and shapes of `jaxsink.checkpoint.param_shapes`, the `nnx.Param`s of the model) and
how their layout changes: a rule may fuse several sources (q, k and v into one per-kv-head
projection). `{i}` in a name is the layer index. `build_params` applies a table to any
`TensorSource` (safetensors shards, a GGUF file), checking that every source tensor is used and
every target filled, and naming the offenders otherwise.

Letters: L layers, D hidden, N heads, K kv heads, G = N / K, H head dim, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxsink.checkpoint import param_shapes
from jaxsink.config import DTYPES, ModelConfig
from jaxsink.quantize import Blocks, quantize_blocks

from .errors import ConvertError

Shape = tuple[int, ...]
Transform = Callable[..., np.ndarray]  # (source arrays..., target shape) -> array of that shape


def identity(w: np.ndarray, shape: Shape) -> np.ndarray:
    """[X] -> [X]: norms, embeddings, unsplit biases, torch Linear weights ([out, in] already)."""
    return w


def split_heads(w: np.ndarray, shape: Shape) -> np.ndarray:
    """A head axis made explicit, the layout kept (shape is the target): an output projection
    [D, N*H] -> [D, N, H]."""
    return w.reshape(shape)


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, shape: Shape) -> np.ndarray:
    """Separate q [N*H, ...], k and v [K*H, ...] projections (weights [.., D] or biases) -> the
    fused per-kv-head layout [K, G + 2, H, ...]: kv head k's G query heads, its key, its value."""
    K, E, H, *rest = shape
    q = q.reshape(K, E - 2, H, *rest)
    return np.concatenate([q, k.reshape(K, 1, H, *rest), v.reshape(K, 1, H, *rest)], axis=1)


def stack(*arrays_and_shape) -> np.ndarray:
    """Several [F, ...] arrays (gate, then up) -> [n, F, ...]."""
    *arrays, _ = arrays_and_shape
    return np.stack(arrays)


def stack_experts(*arrays_and_shape) -> np.ndarray:
    """Per-expert arrays, grouped by part (every expert's gate, then every expert's up; or
    every expert's down) -> [E, parts, ...] ([E, ...] for one part), as the target shape says."""
    *arrays, shape = arrays_and_shape
    parts = len(arrays) // shape[0]
    out = np.stack(arrays).reshape(parts, shape[0], *arrays[0].shape)
    return np.moveaxis(out, 0, 1).reshape(shape)


def split_halves(w: np.ndarray, shape: Shape) -> np.ndarray:
    """A fused [..., 2F, ...] projection whose halves are gate then up -> [..., 2, F, ...]."""
    return w.reshape(shape)


def packed(transform: Transform) -> Transform:
    """Mark a transform that reads packed integer tensors (quantized blocks and scales)."""
    transform.packed = True
    return transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """One jaxsink parameter (its name in `param_shapes`, with `{i}` for every layer that has
    it) made from its source tensors (names with `{i}` for the layer) by `transform`.

    Several rules may fill one target (layouts of the same weights: per-expert tensors or one
    fused tensor): the first whose sources all exist is used."""

    target: str
    sources: tuple[str, ...]
    transform: Transform


@dataclasses.dataclass(frozen=True)
class Table:
    """The rules of one architecture. A rule whose target the `ModelConfig` does not have (a
    bias it lacks, a tied lm_head) is skipped.

    ignored_suffixes: source tensors that carry nothing (recomputed buffers), skipped silently.
    tied_copy: (copy, original): with tied embeddings a file may still hold the output matrix
      as a copy of the embedding; it is accepted only if it equals the original exactly.
    aliases: (old name, name in the rules) of tensors older files name differently.
    base_prefix: a prefix every rule's source name has that checkpoints saved from the bare
      base model lack (Bloom's `transformer.`): a source none of whose names carry it is read
      as if they all did.
    constants: (name, value) of source tensors the config already implies (e.g. stored ALiBi
      slopes): accepted only if they hold that value.
    """

    rules: tuple[Rule, ...]
    ignored_suffixes: tuple[str, ...] = ()
    tied_copy: tuple[str, str] | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    base_prefix: str | None = None
    constants: tuple[tuple[str, np.ndarray], ...] = ()


def layer_rules(prefix: str, names: Mapping[str, tuple | list[tuple]]):
    """Rules of per-layer parameters: target suffix -> (source suffixes, transform), or a list
    of such alternatives (layouts of the same weights, the first present is used), both under
    their layer (`layers.{i}.` and `prefix`)."""
    return tuple(
        Rule(f"layers.{{i}}.{target}", tuple(f"{prefix}.{s}" for s in sources), transform)
        for target, options in names.items()
        for sources, transform in (options if isinstance(options, list) else [options])
    )


def norm(target: str, source: str) -> dict:
    """A norm's scale and, where the config gives it one, bias: `{source}.weight/.bias`."""
    return {
        f"{target}.scale": ((f"{source}.weight",), identity),
        f"{target}.bias": ((f"{source}.bias",), identity),
    }


def linear(target: str, source: str, transform: Transform = identity, bias=identity) -> dict:
    """A projection `{source}.weight` and, where the config gives it one, its bias."""
    return {
        target: ((f"{source}.weight",), transform),
        f"{target}_bias": ((f"{source}.bias",), bias),
    }


def outer(embed: str, final_norm: str, lm_head: str = "lm_head") -> tuple[Rule, ...]:
    """The rules outside the layers: embedding, final norm, output projection (and biases)."""
    names = {"embed": ((f"{embed}.weight",), identity)}
    names |= norm("final_norm", final_norm) | linear("lm_head", lm_head)
    return tuple(Rule(target, sources, f) for target, (sources, f) in names.items())


def llama_attention(attn: str) -> dict:
    """The attention rules of Llama-named projections `{attn}.q_proj` ... `{attn}.o_proj`."""
    return {
        "attn.qkv": (tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), fuse_qkv),
        "attn.qkv_bias": (tuple(f"{attn}.{p}_proj.bias" for p in "qkv"), fuse_qkv),
    }


def llama_layer() -> dict:
    """The per-layer rules of Llama's names (under `model.layers.{i}`), which the Llama-named
    families extend (`families.llama`, `families.stablelm`)."""
    return {
        **norm("norm", "input_layernorm"),
        **norm("mlp_norm", "post_attention_layernorm"),
        **llama_attention("self_attn"),
        **linear("attn.out", "self_attn.o_proj", split_heads),
        "mlp.up": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), stack),
        "mlp.up_bias": (("mlp.gate_proj.bias", "mlp.up_proj.bias"), stack),
        **linear("mlp.down", "mlp.down_proj"),
    }


# Llama's table: what GGUF files are renamed to (`GGUF_TO_HF`), and the names, skipped buffers
# and tied copy of the families that extend it.
LLAMA = Table(
    rules=(
        *outer("model.embed_tokens", "model.norm"),
        *layer_rules("model.layers.{i}", llama_layer()),
    ),
    ignored_suffixes=("rotary_emb.inv_freq",),
    tied_copy=("lm_head.weight", "model.embed_tokens.weight"),
)

_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

# llama.cpp tensor names -> Hugging Face names, so GGUF files reuse the Llama table.
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": f"{_ATTN}.q_proj.weight",
    "blk.{i}.attn_k.weight": f"{_ATTN}.k_proj.weight",
    "blk.{i}.attn_v.weight": f"{_ATTN}.v_proj.weight",
    "blk.{i}.attn_output.weight": f"{_ATTN}.o_proj.weight",
    "blk.{i}.attn_q.bias": f"{_ATTN}.q_proj.bias",
    "blk.{i}.attn_k.bias": f"{_ATTN}.k_proj.bias",
    "blk.{i}.attn_v.bias": f"{_ATTN}.v_proj.bias",
    "blk.{i}.attn_output.bias": f"{_ATTN}.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": f"{_MLP}.gate_proj.weight",
    "blk.{i}.ffn_up.weight": f"{_MLP}.up_proj.weight",
    "blk.{i}.ffn_down.weight": f"{_MLP}.down_proj.weight",
}


def rename(name: str, mapping: Mapping[str, str]) -> str | None:
    """`name` translated by a pattern mapping (`{i}` = a layer index), or None if no entry fits."""
    for pattern, replacement in mapping.items():
        regex = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
        if m := re.fullmatch(regex, name):
            return replacement.format(**m.groupdict())
    return None


class TensorSource(Protocol):
    """Named source tensors, loaded one at a time."""

    def names(self) -> Collection[str]:
        """Every tensor name the source holds."""
        ...

    def load(self, name: str) -> np.ndarray | Blocks:
        """The tensor `name` in the Hugging Face layout (e.g. Linear weights [out, in]), or
        the blocks of one kept quantized (`quantize.Blocks`, same layout)."""
        ...


def plan_sources(cfg: ModelConfig, table: Table, names: Collection[str]) -> dict[str, list[str]]:
    """Which source tensors fill each weight of `cfg` in float (`param_shapes` names of
    `cfg.dequantized()`), after the checks of `build_params`."""
    base = cfg.dequantized()
    plan = _plan(base, table, param_shapes(base), names)
    return {target: names for target, (_, names) in plan.items()}


def build_params(
    cfg: ModelConfig, table: Table, source: TensorSource, dtype: str, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every parameter of `param_shapes(cfg)` filled from `source` by `table`, cast to `dtype`;
    a weight `cfg` keeps quantized is stored as its parts in their checkpoint form
    (`layers.0.attn.qkv.codes`, ...): the blocks the source gives (`quantize.Blocks`, a GGUF's
    kept ones), or those `quantize.quantize_blocks` makes from the float weight (`int8`, `int4`).

    All names are checked before any tensor is read: a missing source tensor or an unused one is
    a ConvertError naming them.
    """
    from jaxsink.config import quantized_weights

    made = quantized_weights(cfg)  # those the source gives in float are quantized here
    shapes = param_shapes(cfg.dequantized())
    source = _Renamed(source, dict(table.aliases), table.base_prefix)
    plan = _plan(cfg.dequantized(), table, shapes, source.names())
    out_dtype = DTYPES[dtype]
    params = {}
    total = sum(len(names) for _, names in plan.values())
    # disable=None: tqdm draws only when stderr is a terminal, never into a log file
    bar = tqdm(total=total, desc="converting", unit="tensor", disable=None if progress else True)
    with bar:
        for target, (rule, names) in plan.items():
            arrays = [source.load(name) for name in names]
            value = _apply(rule, target, names, arrays, shapes[target])
            if target in made and not isinstance(value, Blocks):
                value = quantize_blocks(value, made[target])
            if isinstance(value, Blocks):
                params.update({f"{target}.{k}": v for k, v in value.stored().items()})
            else:
                params[target] = value.astype(out_dtype)
            bar.update(len(names))
    _check_tied_copy(cfg, table, source)
    _check_constants(table, source)
    return params


class _Renamed:
    """A `TensorSource` with some tensors renamed (`Table.aliases`, `Table.base_prefix`)."""

    def __init__(self, source: TensorSource, aliases: Mapping[str, str], base_prefix=None):
        self._source = source
        names = list(source.names())
        bare = base_prefix is not None and not any(n.startswith(base_prefix) for n in names)
        self._new = {(base_prefix if bare else "") + aliases.get(n, n): n for n in names}

    def names(self) -> list[str]:
        return list(self._new)

    def load(self, name: str) -> np.ndarray:
        return self._source.load(self._new[name])


def _check_constants(table: Table, source: TensorSource) -> None:
    """Source tensors the config implies must hold exactly that value (float32 rounding)."""
    for name, want in table.constants:
        if name in source.names():
            got = source.load(name).astype(np.float32)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0):
                raise ConvertError(
                    f"tensor {name} differs from the value its config implies; "
                    "a checkpoint with modified values there is not supported"
                )


def _plan(
    cfg: ModelConfig, table: Table, shapes: Mapping[str, Shape], available: Collection[str]
) -> dict[str, tuple[Rule, list[str]]]:
    """target -> (rule, source names), after checking the names on both sides."""
    candidates: dict[str, list[tuple[Rule, list[str]]]] = {}
    for rule in table.rules:
        layers = range(cfg.num_layers) if "{i}" in rule.target else [None]
        for i in layers:
            target = rule.target.format(i=i)
            if target in shapes:
                sources = [s.format(i=i) for s in rule.sources]
                candidates.setdefault(target, []).append((rule, sources))
    have = set(available)
    plan = {
        target: next((c for c in options if have.issuperset(c[1])), options[0])
        for target, options in candidates.items()
    }
    uncovered = sorted(set(shapes) - set(plan), key=_natural)
    if uncovered:
        raise ConvertError(f"no {cfg.architecture} conversion rule for {_list(uncovered)}")
    wanted = {name for _, names in plan.values() for name in names}
    missing = sorted(wanted - set(available), key=_natural)
    if missing:
        raise ConvertError(f"missing source tensors: {_list(missing)}")
    unused = set(available) - wanted
    unused = {n for n in unused if not n.endswith(table.ignored_suffixes)}
    unused -= {name for name, _ in table.constants}
    if cfg.tie_embeddings and table.tied_copy:
        unused.discard(table.tied_copy[0])
    if unused:
        raise ConvertError(
            f"source tensors the {cfg.architecture} layout does not use: "
            f"{_list(sorted(unused, key=_natural))}"
        )
    return plan


def _apply(
    rule: Rule, target: str, names: list[str], arrays: list[np.ndarray | Blocks], shape: Shape
) -> np.ndarray | Blocks:
    """`rule.transform` on the source tensors of one parameter (on every part of quantized
    ones), checking dtypes and shapes."""
    blocks = [a for a in arrays if isinstance(a, Blocks)]
    if blocks:
        if len(blocks) != len(arrays):
            raise ConvertError(f"{target}: sources {', '.join(names)} mix quantized and float")
        try:
            out = blocks[0].map(rule.transform, blocks[1:], shape)
        except ValueError:
            out = None
        if out is None or out.shape != shape:
            raise ConvertError(f"quantized sources {', '.join(names)} do not fit {target} {shape}")
        return out
    for name, array in zip(names, arrays, strict=True):
        if getattr(rule.transform, "packed", False):
            break
        if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
            raise ConvertError(
                f"tensor {name} has dtype {array.dtype}; only float tensors can be converted "
                "(quantized Hugging Face checkpoints are not supported)"
            )
    try:
        out = rule.transform(*arrays, shape)
    except ValueError:
        out = None
    if out is None or out.shape != shape:
        sizes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, arrays, strict=True))
        raise ConvertError(
            f"source tensors {sizes} do not fit {target} (shape {shape}) under "
            f"{rule.transform.__name__}: the config does not describe these weights"
        )
    return out


def _check_tied_copy(cfg: ModelConfig, table: Table, source: TensorSource) -> None:
    """With tied embeddings, a stored output matrix must be an exact copy of the embedding."""
    if not (cfg.tie_embeddings and table.tied_copy and table.tied_copy[0] in source.names()):
        return
    copy, original = table.tied_copy

    def dense(a):
        return a.dequantize() if isinstance(a, Blocks) else a

    if not np.array_equal(dense(source.load(copy)), dense(source.load(original))):
        raise ConvertError(
            f"the config ties the embeddings but {copy} differs from {original}; "
            "the checkpoint is inconsistent"
        )


def _natural(name: str) -> list:
    """Sort key that orders layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _list(names: list[str], limit: int = 8) -> str:
    """A comma-separated list, shortened after `limit` names."""
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
