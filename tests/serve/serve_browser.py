"""A real browser for the page test: Debian's chromium and chromium-driver, driven by selenium.

When they are missing and this process runs as root on a Debian-like system, they are installed
with apt-get (once: a lock keeps concurrent test processes from installing twice; apt keeps the
downloaded packages in its cache). Elsewhere the test is skipped with the command to run, or fails
under CI (``CI`` set), where the README's test command must give it a browser.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
APT = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
LOCK = Path("/tmp/mukv-apt-chromium.lock")


def _which(names) -> str | None:
    for n in names:
        found = shutil.which(n) if "/" not in n else (n if os.access(n, os.X_OK) else None)
        if found:
            return found
    return None


def find() -> tuple[str | None, str | None]:
    """Paths of the browser and its driver (``None`` where missing)."""
    return _which(BROWSERS), _which(DRIVERS)


def ensure() -> tuple[str, str]:
    """The browser and its driver, installed with apt-get if missing and possible.

    Raises:
        RuntimeError: they are missing and cannot be installed here (with the reason).
    """
    browser, driver = find()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("no chromium/chromedriver and no way to install them here: run "
                           "`apt-get install chromium chromium-driver` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be installing right now
        browser, driver = find()
        if browser and driver:
            return browser, driver
        done = subprocess.run(APT, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:  # stale or missing package lists: update them once, then try again
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(APT, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get could not install chromium: {done.stderr.strip()[-400:]}")
    browser, driver = find()
    if not (browser and driver):
        raise RuntimeError("apt-get installed chromium but its binaries were not found")
    return browser, driver


def driver(width: int = 1280, height: int = 1000):
    """A headless Chrome driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = ensure()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
