"""The system's headless Chromium under Selenium: Debian's `chromium` driven through its own
`chromium-driver`, both given by path so Selenium Manager never goes to the network.

One copy for `screenshot_page.py` and the tests (`tests/support/chromium.py` loads this file
from its path). Selenium, a test dependency, is imported only when a browser starts.
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def headless_chromium(profile: str | Path, width: int = 1280, height: int = 900):
    """A Selenium Chrome driver of a headless Chromium, its window `width` x `height` pixels,
    with the profile folder `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    size = f"--window-size={width},{height}"
    for flag in (*FLAGS, size, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
