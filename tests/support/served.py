"""`jaxsink serve` in a real server process for the tests that talk to it over HTTP (`Server`),
and the samples of its Prometheus /metrics page (`metric_values`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# The stream settings every `Server` runs with.
STREAM = {"sinks": 2, "window": 13, "chunk": 4, "block": 3}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`jaxsink serve` of `model` in a child process on a free port, with the settings of
    `STREAM`, home folder `home` (sessions in `home/sessions`) and further `flags`; constructed
    once its /health answers."""

    def __init__(self, model: Path, home: Path, *flags: str):
        self.port, self.sessions = free_port(), home / "sessions"
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "jaxsink.cli", "serve", "--model", str(model)]
        argv += ["--port", str(self.port), "--sessions-dir", str(self.sessions), *flags]
        for name, value in STREAM.items():
            argv += [f"--{name}", str(value)]
        env = os.environ | {"PYTHONPATH": str(ROOT), "JAXSINK_HOME": str(home)}
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=60)
        return err


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
