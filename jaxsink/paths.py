"""Where jaxsink keeps what it fetches, converts and compiles (a leaf: imports nothing of
jaxsink)."""

from __future__ import annotations

import os
from pathlib import Path


def jaxsink_home() -> Path:
    """Where jaxsink caches models and data: `$JAXSINK_HOME`, else `~/.cache/jaxsink`."""
    home = os.environ.get("JAXSINK_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "jaxsink"
