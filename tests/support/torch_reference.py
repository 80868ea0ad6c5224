"""The reference loop of the streaming contract built from a transformers PyTorch model
(test-only: needs torch): `scripts/torch_reference.py`, its one copy."""

from __future__ import annotations

from tests.support.scripts import script_module

reference_nll = script_module("torch_reference").reference_nll
