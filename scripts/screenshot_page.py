"""A screenshot of `jaxsink serve`'s chat page (docs/web_chat.png) in the system's headless
Chromium: the default model served on a free port, two turns of one conversation typed into
the page at temperature 0, the page captured once the second reply has streamed.

Usage: python scripts/screenshot_page.py [--out docs/web_chat.png] [--model PATH]
Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium
chromium-driver) and selenium. Uses $JAXSINK_HOME's default model unless --model is given.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from chromium import headless_chromium

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant. Answer briefly."
TURNS = ("What is the capital of France?", "And of Italy?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: str | None) -> subprocess.Popen:
    """`jaxsink serve` on `port`, once its /health answers."""
    argv = [sys.executable, "-m", "jaxsink.cli", "serve", "--port", str(port), "--quiet"]
    argv += ["--model", model] if model else []
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"jaxsink serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("jaxsink serve did not start in 10 minutes")


def chat(driver, url: str, timeout: float) -> list[str]:
    """Type TURNS into the page at temperature 0; the replies, once each has streamed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    for name, value in (("system", SYSTEM), ("temperature", "0"), ("max-tokens", "64")):
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    replies = []
    for i, turn in enumerate(TURNS, start=1):
        driver.find_element(By.ID, "message").send_keys(turn, Keys.ENTER)

        def answered(d, count=i):
            done = d.execute_script(
                "return document.querySelectorAll('.msg.assistant').length === arguments[0]"
                " && !document.querySelector('.streaming')",
                count,
            )
            return done and d.find_element(By.ID, "send").is_enabled()

        WebDriverWait(driver, timeout, poll_frequency=0.1).until(answered)
        if driver.find_element(By.ID, "error").is_displayed():
            raise SystemExit("the page shows an error: " + driver.find_element(By.ID, "error").text)
        replies.append(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].text)
    time.sleep(1.0)  # the session's numbers arrive just after the reply
    return replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "web_chat.png"))
    parser.add_argument("--model", help="a jaxsink checkpoint (default: the default model)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per reply")
    args = parser.parse_args()
    port = free_port()
    server = start_server(port, args.model)
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = headless_chromium(profile, height=800)
            try:
                replies = chat(driver, f"http://127.0.0.1:{port}/", args.timeout)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        server.terminate()
        server.wait(60)
    for turn, reply in zip(TURNS, replies, strict=True):
        print(f"> {turn}\n{reply}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
