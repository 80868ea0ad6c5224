"""The headless Chromium of the browser tests: `scripts/chromium.py`, its one copy, loaded from
its path (scripts do not import the tests, so the tests take it from the scripts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "chromium.py"
_SPEC = importlib.util.spec_from_file_location("jaxsink_scripts_chromium", _PATH)
_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MODULE)

CHROMIUM = _MODULE.CHROMIUM
headless_chromium = _MODULE.headless_chromium
