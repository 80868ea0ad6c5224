"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors -> Hugging Face names and layout.

Tensors are dequantized to float32 with `gguf.quants.dequantize` and renamed by
`tables.GGUF_TO_HF`, so the Hugging Face table converts them. llama.cpp stores the q/k rows of
"llama" models permuted for its interleaved rotary layout; `GGUFSource` undoes that, so the
weights equal the Hugging Face ones (jaxsink uses the half-split "rotate_half" layout).

With `--quantize keep` (`keep_quantized`), the matrices stored in Q8_0, Q4_0 or Q4_1 stay in
their blocks (`quantize.Blocks`: the same codes, scales and minimums, so the same values): the
config says which (`config.Quant`), and the checkpoint keeps their bytes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxsink.config import (
    Attention,
    ConfigError,
    LayerSpec,
    Mlp,
    ModelConfig,
    Norm,
    Quant,
    RopeScaling,
    Rotary,
)
from jaxsink.quantize import Blocks

from .errors import ConvertError
from .hf import refusal
from .tables import GGUF_TO_HF, LLAMA, plan_sources, rename

SUPPORTED = ("llama", "qwen2")
PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes
GGUF_TABLE = LLAMA  # GGUF tensors are renamed to Llama's Hugging Face names (GGUF_TO_HF)

# `{arch}.` metadata keys read here; any other key under the architecture prefix is refused.
ARCH_KEYS = frozenset(
    {
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "vocab_size",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "rope.dimension_count",
        "rope.freq_base",
        "rope.scale_linear",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.scaling.original_context_length",
        "rope.scaling.finetuned",
    }
)
ZERO_KEYS = ("expert_count", "expert_used_count")  # accepted only when 0 (a dense model)
# Far above any published GGUF (a few thousand tensors, a few dozen metadata keys): a file
# claiming more is refused before the reader walks it.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_DIMS = 4  # ggml tensors have at most four dimensions
# GGML block formats `--quantize keep` keeps: type name -> `config.Quant` kind
KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    """(metadata `key -> value`, the `gguf.GGUFReader`) of a GGUF file (memory-mapped).

    The counts in its header are checked before the reader walks them, and every tensor's
    shape and bytes against the file's size before any is read.
    """
    from gguf import GGUFReader

    _check_counts(path)
    try:
        reader = GGUFReader(str(path))
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        # a truncated or hostile file fails somewhere in the reader's walk of its header
        raise ConvertError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): it is truncated or "
            "corrupt; download it again"
        ) from None
    _check_tensors(path, reader.tensors)
    if meta.get("split.count", 1) > 1:
        raise ConvertError(f"{path} is one part of a split GGUF; merge it with gguf-split first")
    return meta, reader


def _check_counts(path: Path) -> None:
    """Refuse a GGUF whose header claims more tensors or metadata keys than any model has."""
    with open(path, "rb") as f:
        head = f.read(24)  # magic, version, tensor count, key count
    if len(head) == 24 and head[:4] == b"GGUF":
        tensors, keys = (int.from_bytes(head[i : i + 8], "little") for i in (8, 16))
        if tensors > MAX_TENSORS or keys > MAX_KEYS:
            raise ConvertError(
                f"{path} claims {tensors} tensors and {keys} metadata keys (at most "
                f"{MAX_TENSORS} and {MAX_KEYS}): the file is corrupt or hostile"
            )


def _check_tensors(path: Path, tensors: list) -> None:
    """Every tensor has at most four dimensions, each at least 1, and its bytes inside the
    file: checked before any tensor is read or dequantized."""
    from gguf import GGML_QUANT_SIZES

    size = path.stat().st_size
    for t in tensors:
        dims = [int(d) for d in t.shape]
        block, type_bytes = GGML_QUANT_SIZES[t.tensor_type]
        # exact in Python ints: the reader's numpy product of the dimensions can wrap around
        n_bytes = math.prod(dims) * type_bytes // block
        if not 1 <= len(dims) <= MAX_DIMS or min(dims) < 1 or n_bytes != t.n_bytes:
            raise ConvertError(f"{path}: tensor {t.name} has impossible dimensions {dims}")
        if t.data_offset + n_bytes > size or t.data.nbytes != n_bytes:
            raise ConvertError(
                f"{path}: tensor {t.name} ({dims}) runs past the end of the file: it is "
                "truncated; download it again"
            )


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str]) -> ModelConfig:
    """The ModelConfig described by GGUF metadata and the tensor names present.

    Biases and tied embeddings follow from which tensors exist, as in llama.cpp.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise ConvertError("GGUF: " + refusal(arch, list(SUPPORTED)))
    _check_keys(arch, meta)
    if "rope_freqs.weight" in tensor_names:
        raise ConvertError(
            "GGUF has rope_freqs.weight (Llama 3.1-style rope scaling); not supported for GGUF "
            "yet, convert the Hugging Face model instead"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConvertError(f"GGUF metadata lacks {arch}.{key}")
        return value

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // num_heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        if get(key, head_dim) != head_dim:
            raise ConvertError(
                f"GGUF {arch}.{key} = {get(key)} differs from the head dim {head_dim}; "
                "not supported"
            )
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    eos = [meta[f"tokenizer.ggml.{k}"] for k in eos_keys if f"tokenizer.ggml.{k}" in meta]
    norm = Norm("rms", float(get("attention.layer_norm_rms_epsilon")))
    attention = Attention(
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        position=Rotary(
            theta=float(get("rope.freq_base", 10000.0)),  # llama.cpp's default
            dim=head_dim,
            scaling=_rope_scaling(arch, meta),
        ),
        query_scale=head_dim**-0.5,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        out_bias="blk.0.attn_output.bias" in tensor_names,
    )
    mlp = Mlp(get("feed_forward_length"), "silu", bias="blk.0.ffn_up.bias" in tensor_names)
    return ModelConfig(
        architecture=arch,
        vocab_size=get("vocab_size", len(tokens) or None),
        hidden_size=hidden,
        layers=(LayerSpec(attention, mlp, norm),) * get("block_count"),
        final_norm=norm,
        max_position_embeddings=get("context_length"),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def _check_keys(arch: str, meta: Mapping[str, Any]) -> None:
    """Refuse `{arch}.` metadata this module does not understand (e.g. experts of a MoE)."""
    prefix = f"{arch}."
    keys = {k.removeprefix(prefix) for k in meta if k.startswith(prefix)}
    unknown = sorted(keys - ARCH_KEYS - set(ZERO_KEYS))
    nonzero = [k for k in ZERO_KEYS if meta.get(prefix + k, 0) != 0]
    if unknown or nonzero:
        names = ", ".join(prefix + k for k in unknown + nonzero)
        raise ConvertError(f"GGUF metadata jaxsink does not understand: {names}")


def _rope_scaling(arch: str, meta: Mapping[str, Any]) -> RopeScaling | None:
    """Rotary scaling from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`)."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none" and meta.get(f"{arch}.rope.scale_linear", 1.0) != 1.0:
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind == "none":
        return None
    if kind != "linear":
        raise ConvertError(f"unsupported GGUF rope scaling type {kind!r} (supported: none, linear)")
    if factor is None:
        raise ConvertError(f"GGUF metadata lacks {arch}.rope.scaling.factor")
    return RopeScaling("linear", float(factor))


def undo_qk_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows [N*H, ...] of a q/k weight or bias from llama.cpp's interleaved rotary order back to
    Hugging Face's half-split order (the inverse of convert_hf_to_gguf's `permute`)."""
    return (
        w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class GGUFSource:
    """The tensors of a GGUF file under Hugging Face names, dequantized on load, except those
    named in `keep` (Hugging Face names), which load as their blocks (`quantize.Blocks`).

    Names with no Hugging Face counterpart keep their GGUF name, so the conversion's unused-tensor
    check reports them.
    """

    def __init__(self, reader: Any, cfg: ModelConfig, keep: Collection[str] = ()):
        self._tensors = {rename(t.name, GGUF_TO_HF) or t.name: t for t in reader.tensors}
        self._keep = frozenset(keep)
        self._heads = {}
        if cfg.architecture in PERMUTED_QK:
            attention = cfg.layers[0].attention
            self._heads = {"q_proj": attention.num_heads, "k_proj": attention.num_kv_heads}

    def names(self) -> list[str]:
        """Every tensor name (Hugging Face names where known)."""
        return list(self._tensors)

    def type_name(self, name: str) -> str:
        """The GGML type of tensor `name` (`F32`, `Q4_1`, ...)."""
        return self._tensors[name].tensor_type.name

    def load(self, name: str) -> np.ndarray | Blocks:
        """One tensor in the Hugging Face layout ([out, in] for Linear weights): float32, or
        its blocks if it is kept quantized."""
        from gguf import dequantize

        t = self._tensors[name]
        proj = name.split(".")[-2]
        if name in self._keep:
            w = gguf_blocks(t.data, KEPT[t.tensor_type.name])
            if proj in self._heads:
                n = self._heads[proj]
                w = w.map(lambda a, _shape: undo_qk_permutation(a, n), [], w.shape)
            return w
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConvertError(
                f"GGUF tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        w = w.reshape(tuple(reversed(t.shape.tolist())))  # GGUF lists dims innermost first
        if proj in self._heads:
            w = undo_qk_permutation(w, self._heads[proj])
        return w


def gguf_blocks(data: np.ndarray, kind: str) -> Blocks:
    """GGML blocks of rows [rows, row bytes] uint8 (a 2-D tensor's data) -> `quantize.Blocks`
    [rows, n]: the same codes, scales and minimums. Per block of 32 values: Q8_0 is a float16
    scale and 32 int8 codes; Q4_0 a scale and 16 bytes of codes (value j in the low nibble of
    byte j, value j + 16 in its high nibble, each minus 8); Q4_1 a scale, a float16 minimum and
    16 bytes of codes in [0, 15]."""
    spec = Quant(kind)
    data = np.asarray(data, np.uint8)
    scalars = 2 if kind == "q4_1" else 1  # float16s before the codes
    size = 2 * scalars + (spec.block if spec.bits == 8 else spec.block // 2)
    rows = data.reshape(*data.shape[:-1], -1, size)  # [..., blocks, block bytes]
    halves = [np.ascontiguousarray(rows[..., 2 * i : 2 * i + 2]).view(np.float16)[..., 0]
              for i in range(scalars)]  # fmt: skip
    packed = rows[..., 2 * scalars :]
    if spec.bits == 8:
        codes = packed.view(np.int8)
    else:
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8)
        if kind == "q4_0":
            codes = codes - np.int8(8)
    codes = codes.reshape(*data.shape[:-1], -1)
    return Blocks(spec, codes, halves[0], halves[1] if scalars == 2 else None)


def keep_quantized(cfg: ModelConfig, source: GGUFSource) -> tuple[ModelConfig, set[str], str]:
    """What `--quantize keep` keeps: (cfg with every matrix whose GGUF tensors are all of one
    kept format (`KEPT`) quantized as they are, the source names loaded as blocks, and a line
    naming the other quantized tensors, which are dequantized: empty if none)."""
    from jaxsink.config import quantize_config

    kept: dict[str, Quant] = {}
    keep: set[str] = set()
    for target, names in plan_sources(cfg, GGUF_TABLE, source.names()).items():
        kinds = {KEPT.get(source.type_name(n)) for n in names}
        if len(kinds) != 1 or None in kinds:
            continue
        spec = Quant(kinds.pop())
        try:
            quantize_config(cfg, {**kept, target: spec})
        except (ConfigError, KeyError):  # not a product weight, or sizes that do not fit
            continue
        kept[target] = spec
        keep.update(names)
    dequantized: dict[str, int] = {}
    for name in source.names():
        kind = source.type_name(name)
        if name not in keep and kind not in FLOAT_TYPES:
            dequantized[kind] = dequantized.get(kind, 0) + 1
    line = ""
    if dequantized:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(dequantized.items()))
        line = (
            f"{sum(dequantized.values())} quantized tensors ({counts}) are dequantized to "
            f"float: --quantize keep keeps the {', '.join(KEPT)} matrices"
        )
    return quantize_config(cfg, kept), keep, line
