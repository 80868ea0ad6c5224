"""What the tests take from `scripts/`: a script module loaded from its path (scripts do not
import the tests, so the one copy of what both need lives in the scripts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script_module(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module (named `jaxsink_scripts_<name>`)."""
    spec = importlib.util.spec_from_file_location(f"jaxsink_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
