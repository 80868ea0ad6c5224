"""Hugging Face model folders: `config.json` -> ModelConfig, safetensors weights, hub download.

Both config formats are read: transformers 4.x (`rope_theta`, `rope_scaling` with `type` or
`rope_type`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`). Every key of `config.json` is
either used, listed as harmless, or refused by name: a key we do not understand could change the
model, and converting it anyway would give a silently wrong model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safe_open can return it
import numpy as np

from jaxsink.config import JaxsinkError, RopeScaling
from jaxsink.files import CheckpointError, check_safetensors, read_json_object

from .errors import ConvertError

# Architectures we understand but cannot stream: their positions are learned absolute embeddings.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo", "opt")


def refusal(arch: str, supported: list[str]) -> str:
    """Why `arch` cannot be converted, naming the architectures that can."""
    names = ", ".join(sorted(supported))
    if arch in LEARNED_POSITIONS:
        return (
            f"unsupported architecture {arch!r}: it uses learned absolute position embeddings, so "
            "a token's position is baked into its input and cached keys cannot be re-positioned "
            f"when the window slides, which attention sinks require (supported: {names})"
        )
    return f"unsupported architecture {arch!r} (supported: {names})"


# Keys that do not change the function the weights compute.
HARMLESS = frozenset(
    {
        # bookkeeping
        "architectures",
        "transformers_version",
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "torch_dtype",
        "dtype",
        "is_llama_config",  # nanotron's marker (SmolLM2)
        "transformers.js_config",
        # training only
        "initializer_range",
        "attention_dropout",
        "use_cache",
        # the kind of cache transformers' generate builds (Gemma 2's "hybrid" in 4.x)
        "cache_implementation",
        # token ids that play no part in the forward pass
        "pad_token_id",
        "unk_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        # PretrainedConfig attributes that a full `to_dict()` writes for every model
        "id2label",
        "label2id",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "problem_type",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "finetuning_task",
        "prefix",
        "task_specific_params",
        "tokenizer_class",
        # generation defaults stored in old configs (jaxsink has its own sampling flags)
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)

# Keys of a rope dict, per rope type (besides `rope_type` / `type` / `rope_theta` /
# `partial_rotary_factor`): required, then optional.
ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        (),
    ),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "longrope": (
        ("short_factor", "long_factor", "original_max_position_embeddings"),
        ("factor", "attention_factor"),
    ),
}
# Rope dict keys that transformers fills in from the model's own config when they are absent.
_FROM_CONTEXT = ("original_max_position_embeddings",)

WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or ConvertError."""
    return read_json_object(path, ConvertError)


@contextlib.contextmanager
def malformed_values(source: Path):
    """Errors of reading a config (or GGUF metadata) from `source` as one ConvertError naming
    it: a hostile file's values of the wrong type surface as Python errors anywhere in the
    readers' arithmetic, and must still end as one clear line."""
    try:
        yield
    except JaxsinkError as e:
        raise ConvertError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise ConvertError(
            f"{source}: a value has the wrong type or is out of range "
            f"({type(e).__name__}: {e}); fix the file or download it again"
        ) from None


class ConfigReader:
    """A Hugging Face config dict being read: every key taken is removed, so what is left at
    the end is what nobody understood (`check_all_read`).

    defaults: transformers' values for keys a config.json may omit.
    """

    def __init__(self, config: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.d = dict(config)
        self.defaults = dict(defaults)

    def take(self, key: str, default: Any = None) -> Any:
        """The value of `key` (removed), else its transformers default, else `default`."""
        value = self.d.pop(key, None)
        if value is None:
            value = self.defaults.get(key, default)
        return value

    def explicit(self, key: str) -> Any:
        """The value of `key` (removed) even if it is null, else its transformers default: for
        keys whose null means "off" where the default is on (a soft-cap)."""
        return self.d.pop(key) if key in self.d else self.defaults.get(key)

    def derived(self, key: str, value: Any, rule: str) -> None:
        """A key the family's reference code derives from other keys (`rule`) and newer
        transformers writes out: accepted when it equals `value`, what jaxsink derives the
        same way, else refused naming both values."""
        given = self.d.pop(key, None)
        if given is not None and given != value:
            raise ConvertError(
                f"{key} = {given!r} disagrees with {value!r}, what {rule} give; fix the config"
            )

    def ignore(self, *keys: str) -> None:
        """Drop keys that change nothing at inference (dropout, precision, kernel choice)."""
        for key in keys:
            self.d.pop(key, None)

    def check_all_read(self, what: str) -> None:
        """Refuse, by name, every key no reader took and that is not harmless. what: whose
        keys they are (an architecture, or a nested config of one)."""
        unknown = sorted(set(self.d) - HARMLESS)
        if unknown:
            raise ConvertError(
                f"config keys jaxsink does not understand for {what}: {', '.join(unknown)} "
                "(refusing to guess what they change)"
            )


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """What a config says about rotary positions: base, scaling, and the fraction of each
    head rotated (None: not given)."""

    theta: float
    scaling: RopeScaling | None
    partial: float | None = None


def read_rope(
    d: dict,
    default_theta: float,
    max_position: int | None = None,
    original_max: int | None = None,
) -> RopeSpec:
    """The rotary spec of 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`; pops
    those keys from `d`.

    max_position: the model's `max_position_embeddings`, which transformers uses for an absent
    `original_max_position_embeddings` (and longrope for an absent `factor`); original_max: a
    top-level `original_max_position_embeddings` (Phi-3), which wins over the rope dict's.
    """
    params = d.pop("rope_parameters", None)
    legacy = d.pop("rope_scaling", None)
    top_theta = d.pop("rope_theta", None)
    if params is not None and legacy is not None and params != legacy:
        raise ConvertError("rope_parameters and rope_scaling disagree")
    spec = dict(params if params is not None else legacy or {})
    theta = spec.pop("rope_theta", None)
    if theta is not None and top_theta is not None and float(theta) != float(top_theta):
        raise ConvertError(f"rope_theta {top_theta} disagrees with rope_parameters ({theta})")
    theta = float(
        theta if theta is not None else top_theta if top_theta is not None else default_theta
    )
    partial = spec.pop("partial_rotary_factor", None)
    partial = None if partial is None else float(partial)
    kind = spec.pop("rope_type", None)
    legacy_kind = spec.pop("type", None)
    if kind is not None and legacy_kind is not None and kind != legacy_kind:
        raise ConvertError(f"rope type {kind!r} disagrees with type {legacy_kind!r}")
    kind = kind or legacy_kind or "default"
    if kind not in ROPE_KEYS:
        raise ConvertError(
            f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_KEYS)})"
        )
    required, optional = ROPE_KEYS[kind]
    if "original_max_position_embeddings" in required:
        if original_max is not None:
            spec["original_max_position_embeddings"] = original_max
        elif spec.get("original_max_position_embeddings") is None:
            spec["original_max_position_embeddings"] = max_position
    if kind == "longrope" and spec.get("factor") is None and max_position is not None:
        spec["factor"] = max_position / spec["original_max_position_embeddings"]
    problems = []
    if unknown := sorted(set(spec) - set(required) - set(optional)):
        problems.append(f"unknown keys {', '.join(unknown)}")
    if absent := [k for k in required if spec.get(k) is None]:
        problems.append(f"missing keys {', '.join(absent)}")
    if problems:
        raise ConvertError(f"rope type {kind!r}: {'; '.join(problems)}")
    if kind == "default":
        return RopeSpec(theta, None, partial)
    spec = {k: v for k, v in spec.items() if v is not None}
    scaling = RopeScaling(
        kind,
        factor=float(spec.pop("factor", 1.0)),
        **{k: _rope_value(k, v) for k, v in spec.items()},
    )
    return RopeSpec(theta, scaling, partial)


def _rope_value(key: str, value):
    """A rope dict value in the type `RopeScaling` keeps it in."""
    if key in ("short_factor", "long_factor"):
        if not isinstance(value, list):
            raise ConvertError(f"rope {key} must be a list of numbers")
        return tuple(float(v) for v in value)
    if key == "original_max_position_embeddings":
        return int(value)
    if key == "truncate":
        return bool(value)
    return float(value)


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(
    layer_types: list[str] | None, window: int | None, num_layers: int, max_pos: int
) -> tuple[int | None, ...]:
    """Each layer's native sliding window (None: a full layer) from a config's `layer_types`
    (None: every layer full) and `sliding_window`.

    A window of at least `max_position_embeddings` changes nothing over the trained context,
    so its layers are full ones; so are all layers when the config gives no window (as
    transformers masks them).
    """
    if layer_types is None:
        layer_types = ["full_attention"] * num_layers
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConvertError(f"layer_types must list {num_layers} layer kinds, got {layer_types!r}")
    if unknown := sorted(set(layer_types) - set(LAYER_TYPES)):
        raise ConvertError(
            f"unknown layer_types {', '.join(map(str, unknown))} (supported: "
            f"{', '.join(LAYER_TYPES)})"
        )
    if window is not None and (not isinstance(window, int) or window < 2):
        raise ConvertError(f"sliding_window must be an integer >= 2, got {window!r}")
    if window is None or window >= max_pos:
        return (None,) * num_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (sharded via the index, or single).

    Refuses pickled checkpoints (`pytorch_model.bin`, `.pt`, ...) without loading them.
    """
    index = src / WEIGHT_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index} has no weight_map")
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConvertError(f"{index} lists missing shards: {', '.join(absent)}")
        return files
    if (src / WEIGHT_FILE).is_file():
        return [src / WEIGHT_FILE]
    pickles = sorted(p for p in src.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise pickle_refusal(pickles[0])
    raise ConvertError(f"{src} has no {WEIGHT_FILE} or {WEIGHT_INDEX}")


def pickle_refusal(path: Path) -> ConvertError:
    """The error for a pickled checkpoint, which is never loaded (unpickling runs code)."""
    return ConvertError(
        f"{path} is a pickled PyTorch checkpoint; safetensors is required (pickles can run "
        "arbitrary code and are never loaded). Re-save the model with transformers' "
        "save_pretrained, or use a repository that ships model.safetensors"
    )


class SafetensorsSource:
    """Tensors of safetensors files, read lazily (memory-mapped) one at a time by name.

    Use as a context manager; the files stay open until exit. Each file's header is checked
    against its bytes (`check_safetensors`) before safetensors opens it.
    """

    def __init__(self, files: list[Path]):
        self._files = files
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> SafetensorsSource:
        from safetensors import safe_open

        for path in self._files:
            try:
                check_safetensors(path)
            except CheckpointError as e:  # the source's problem, not a checkpoint's
                self._stack.close()
                raise ConvertError(str(e)) from None
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as e:  # safetensors raises its own error types for bad headers
                self._stack.close()
                raise ConvertError(f"cannot read {path}: {e}") from None
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if name in self._handles:
                    self._stack.close()
                    raise ConvertError(f"tensor {name} appears in more than one shard")
                self._handles[name] = (handle, path)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        """Every tensor name over all files."""
        return list(self._handles)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers (nothing loaded)."""
        return {
            name: tuple(handle.get_slice(name).get_shape())
            for name, (handle, _) in self._handles.items()
        }

    def load(self, name: str) -> np.ndarray:
        """One tensor as numpy (bfloat16 comes back as ml_dtypes.bfloat16)."""
        handle, path = self._handles[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:  # a truncated file fails here, with safetensors' own error type
            raise ConvertError(f"cannot read tensor {name} from {path}: {e}") from None


def looks_like_hub_id(spec: str) -> bool:
    """Whether `spec` has the `org/name` shape of a Hugging Face hub repository id."""
    return bool(HUB_ID.fullmatch(spec)) and not spec.startswith(".")


def download(repo_id: str) -> Path:
    """Download the files conversion needs from the hub (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        allow_patterns=HUB_PATTERNS,
        ignore_patterns=["consolidated*.safetensors", "original/*"],
    )
    return Path(path)
