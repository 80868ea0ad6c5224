"""The reference loop of the streaming contract built from a transformers PyTorch model
(test-only: needs torch): `scripts/torch_reference.py`, its one copy, loaded from its path
(scripts do not import the tests, so the tests take it from the scripts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "torch_reference.py"
_SPEC = importlib.util.spec_from_file_location("jaxsink_scripts_torch_reference", _PATH)
_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MODULE)

reference_nll = _MODULE.reference_nll
