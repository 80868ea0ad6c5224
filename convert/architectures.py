"""Kept for `jaxsink.plan`, until it imports `jaxsink.convert.families`: the family registry
and its config readers live in `families/` (one module per family, joined in
`families/__init__.py`)."""

from __future__ import annotations

from .families import FAMILIES, config_from_hf, read_hf_config

__all__ = ["FAMILIES", "config_from_hf", "read_hf_config"]
