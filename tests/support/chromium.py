"""The headless Chromium of the browser tests: `scripts/chromium.py`, its one copy."""

from __future__ import annotations

from tests.support.scripts import script_module

_CHROMIUM = script_module("chromium")
CHROMIUM = _CHROMIUM.CHROMIUM
headless_chromium = _CHROMIUM.headless_chromium
