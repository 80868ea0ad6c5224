"""Declarative name tables: source tensor -> jaxsink parameter -> named layout transform.

A `Table` says, for one architecture, which Hugging Face tensor fills which jaxsink parameter
(the names and shapes of `jaxsink.checkpoint.param_shapes`) and how its layout changes. `{i}` in a
source name is the layer index; those tensors are stacked along a new leading layer axis L.
`build_params` applies a table to any `TensorSource` (safetensors shards, a GGUF file), checking
that every source tensor is used and every target filled, and naming the offenders otherwise.

Letters: L layers, D hidden, N heads (query or kv), H head dim, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxsink.checkpoint import DTYPES, param_shapes
from jaxsink.config import ModelConfig

from .errors import ConvertError

Shape = tuple[int, ...]
Transform = Callable[[np.ndarray, Shape], np.ndarray]


def identity(w: np.ndarray, shape: Shape) -> np.ndarray:
    """[X] -> [X]: norms, embeddings, unsplit biases, torch Linear weights ([out, in] already)."""
    return w


def split_heads(w: np.ndarray, shape: Shape) -> np.ndarray:
    """A head axis made explicit, the layout kept (shape is the target): q/k/v_proj weight
    [N*H, D] -> [N, H, D], o_proj weight [D, N*H] -> [D, N, H], q/k/v_proj bias [N*H] -> [N, H]."""
    return w.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One jaxsink parameter: its source tensor name (with `{i}` if per layer) and transform."""

    source: str
    target: str
    transform: Transform


@dataclasses.dataclass(frozen=True)
class Table:
    """The rules of one architecture.

    ignored_suffixes: source tensors that carry nothing (recomputed buffers), skipped silently.
    tied_copy: (copy, original): with tied embeddings a file may still hold the output matrix
      as a copy of the embedding; it is accepted only if it equals the original exactly.
    """

    rules: tuple[Rule, ...]
    ignored_suffixes: tuple[str, ...] = ()
    tied_copy: tuple[str, str] | None = None


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

LLAMA = Table(
    rules=(
        Rule("model.embed_tokens.weight", "embed", identity),  # [V, D]
        Rule("model.norm.weight", "final_norm", identity),  # [D]
        Rule("lm_head.weight", "lm_head", identity),  # [V, D]
        Rule("model.layers.{i}.input_layernorm.weight", "layers.attn_norm", identity),
        Rule(f"{_ATTN}.q_proj.weight", "layers.wq", split_heads),
        Rule(f"{_ATTN}.k_proj.weight", "layers.wk", split_heads),
        Rule(f"{_ATTN}.v_proj.weight", "layers.wv", split_heads),
        Rule(f"{_ATTN}.o_proj.weight", "layers.wo", split_heads),
        Rule(f"{_ATTN}.q_proj.bias", "layers.bq", split_heads),
        Rule(f"{_ATTN}.k_proj.bias", "layers.bk", split_heads),
        Rule(f"{_ATTN}.v_proj.bias", "layers.bv", split_heads),
        Rule(f"{_ATTN}.o_proj.bias", "layers.bo", identity),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm", identity),
        Rule(f"{_MLP}.gate_proj.weight", "layers.w_gate", identity),  # [F, D]
        Rule(f"{_MLP}.up_proj.weight", "layers.w_up", identity),
        Rule(f"{_MLP}.down_proj.weight", "layers.w_down", identity),  # [D, F]
        Rule(f"{_MLP}.gate_proj.bias", "layers.b_gate", identity),
        Rule(f"{_MLP}.up_proj.bias", "layers.b_up", identity),
        Rule(f"{_MLP}.down_proj.bias", "layers.b_down", identity),
    ),
    ignored_suffixes=("rotary_emb.inv_freq",),
    tied_copy=("lm_head.weight", "model.embed_tokens.weight"),
)

# Hugging Face model_type -> table. Mistral and Qwen2 name their tensors like Llama; which
# optional rules apply (biases, lm_head) follows from the ModelConfig via param_shapes.
TABLES: dict[str, Table] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}

# llama.cpp tensor names -> Hugging Face names, so GGUF files reuse TABLES.
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

    def load(self, name: str) -> np.ndarray:
        """The tensor `name` in the Hugging Face layout (e.g. Linear weights [out, in])."""
        ...


def build_params(
    cfg: ModelConfig, table: Table, source: TensorSource, dtype: str, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every parameter of `param_shapes(cfg)` filled from `source` by `table`, cast to `dtype`.

    All names are checked before any tensor is read: a missing source tensor or an unused one is
    a ConvertError naming them. Per-layer tensors are stacked into [L, ...].
    """
    shapes = param_shapes(cfg)
    plan = _plan(cfg, table, shapes, source.names())
    out_dtype = DTYPES[dtype]
    params = {}
    total = sum(len(names) for _, names in plan.values())
    with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
        for target, (rule, names) in plan.items():
            out = np.empty(shapes[target], out_dtype)
            stacked = "{i}" in rule.source
            shape = shapes[target][1:] if stacked else shapes[target]
            for i, name in enumerate(names):
                out[i if stacked else ...] = _apply(rule, name, source.load(name), shape)
                bar.update()
            params[target] = out
    _check_tied_copy(cfg, table, source)
    return params


def _plan(
    cfg: ModelConfig, table: Table, shapes: Mapping[str, Shape], available: Collection[str]
) -> dict[str, tuple[Rule, list[str]]]:
    """target -> (rule, source names), after checking the names on both sides."""
    rules = {r.target: r for r in table.rules if r.target in shapes}
    uncovered = sorted(set(shapes) - set(rules))
    if uncovered:
        raise ConvertError(f"no {cfg.architecture} conversion rule for {_list(uncovered)}")
    plan = {
        target: (
            rule,
            [rule.source.format(i=i) for i in range(cfg.num_layers)]
            if "{i}" in rule.source
            else [rule.source],
        )
        for target, rule in rules.items()
    }
    wanted = {name for _, names in plan.values() for name in names}
    missing = sorted(wanted - set(available), key=_natural)
    if missing:
        raise ConvertError(f"missing source tensors: {_list(missing)}")
    unused = set(available) - wanted
    unused = {n for n in unused if not n.endswith(table.ignored_suffixes)}
    if cfg.tie_embeddings and table.tied_copy:
        unused.discard(table.tied_copy[0])
    if unused:
        raise ConvertError(
            f"source tensors the {cfg.architecture} layout does not use: "
            f"{_list(sorted(unused, key=_natural))}"
        )
    return plan


def _apply(rule: Rule, name: str, array: np.ndarray, shape: Shape) -> np.ndarray:
    """`rule.transform` on one source tensor, checking dtype and shapes."""
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
        raise ConvertError(
            f"tensor {name} has dtype {array.dtype}; only float tensors can be converted "
            "(quantized Hugging Face checkpoints are not supported)"
        )
    try:
        out = rule.transform(array, shape)
    except ValueError:
        out = None
    if out is None or out.shape != shape:
        raise ConvertError(
            f"tensor {name} has shape {tuple(array.shape)}, which does not fit {rule.target} "
            f"(per-layer shape {shape}) under {rule.transform.__name__}"
        )
    return out


def _check_tied_copy(cfg: ModelConfig, table: Table, source: TensorSource) -> None:
    """With tied embeddings, a stored output matrix must be an exact copy of the embedding."""
    if not (cfg.tie_embeddings and table.tied_copy and table.tied_copy[0] in source.names()):
        return
    copy, original = table.tied_copy
    if not np.array_equal(source.load(copy), source.load(original)):
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
