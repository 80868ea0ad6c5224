"""Every supported Hugging Face architecture, by `model_type`, and the reading of a config
through them.

Each family module (one per family, or per group of close families) holds, together, its
config reader (the config keys read into a `ModelConfig`, one `LayerSpec` per layer), its
tensor table and its registry entries (`FAMILIES`, `model_type -> Family`), built from the
shared pieces in `common`. This registry joins the modules' entries. A family module imports
`common`, `tables` and `hf`, never another family nor this registry. To add a family, write its
module and list it in `_MODULES`.

A family's reader takes each key it understands from a `ConfigReader`; whatever is left when it
returns is refused by name (`config_from_hf`), so a key that could change the model is never
silently ignored. Qwen v1 (`qwen`) and BTLM (`btlm`) ship their modeling code with their
checkpoints rather than in transformers; they are read as that published code computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxsink.config import ModelConfig

from ..errors import ConvertError
from ..hf import ConfigReader, malformed_values, read_json, refusal
from . import (
    bloom,
    btlm,
    falcon,
    gemma,
    gpt_neox,
    gpt_oss,
    gptj,
    llama,
    mpt,
    phi,
    phi3,
    qwen,
    stablelm,
)
from .common import Family

__all__ = ["FAMILIES", "Family", "config_from_hf", "read_hf_config"]

_MODULES = (
    llama,
    gpt_neox,
    gptj,
    falcon,
    mpt,
    stablelm,
    phi,
    qwen,
    phi3,
    gemma,
    gpt_oss,
    bloom,
    btlm,
)


def _join(modules) -> dict[str, Family]:
    """The modules' `FAMILIES` in one dict; a `model_type` claimed twice is a bug."""
    out: dict[str, Family] = {}
    for module in modules:
        if twice := out.keys() & module.FAMILIES.keys():
            raise RuntimeError(f"{module.__name__} claims {', '.join(sorted(twice))} again")
        out |= module.FAMILIES
    return out


FAMILIES: dict[str, Family] = _join(_MODULES)


def read_hf_config(src: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder (`config.json`, plus the end-of-sequence ids of
    `generation_config.json` if present)."""
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{src} has no config.json (not a Hugging Face model folder)")
    gen_file = src / "generation_config.json"
    generation = read_json(gen_file) if gen_file.is_file() else {}
    config = read_json(cfg_file)
    with malformed_values(cfg_file):
        return config_from_hf(config, generation)


def config_from_hf(
    config: Mapping[str, Any], generation: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Map a Hugging Face `config.json` dict (transformers 4.x or 5.x) to a ModelConfig.

    generation: the `generation_config.json` dict; its `eos_token_id`s join the config's.
    Raises ConvertError for an unsupported architecture, rope type, sliding window or any key
    this function does not understand.
    """
    d = dict(config)
    arch = d.pop("model_type", None)
    if arch not in FAMILIES:
        raise ConvertError(refusal(arch, list(FAMILIES)))
    family = FAMILIES[arch]
    missing = [k for k in family.required if d.get(k) is None]
    if missing:
        raise ConvertError(f"missing required keys: {', '.join(missing)}")
    reader = ConfigReader(d, family.defaults)
    cfg = family.read(arch, reader)
    eos = _ids(reader.take("eos_token_id")) + _ids((generation or {}).get("eos_token_id"))
    cfg = dataclasses.replace(
        cfg, bos_token_id=reader.take("bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos))
    )
    reader.check_all_read(arch)
    return cfg


def _ids(value: int | list[int] | None) -> list[int]:
    """Token ids given as one int, a list or null."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
