"""Headless Chromium for the browser tests (Debian's chromium + chromium-driver, driven by selenium).

`chromium_driver()` installs what is missing when it can (apt-get as root, pip for selenium) and
skips the test with the reason only when that fails. Screenshots come back as (H, W, 3) arrays.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
DOCS = Path(__file__).resolve().parents[1] / "docs"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # WebGL without a GPU: ANGLE on SwiftShader renders viser's splats in software.
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]

_install_tried = False


def _find_binaries() -> tuple[str | None, str | None]:
    browser = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    return browser, driver


def _ensure_chromium() -> tuple[str, str]:
    global _install_tried
    browser, driver = _find_binaries()
    if browser and driver:
        return browser, driver
    if not _install_tried and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        _install_tried = True
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        subprocess.run(APT_INSTALL, env=env, capture_output=True, timeout=900)
        browser, driver = _find_binaries()
    if not (browser and driver):
        pytest.skip(f"chromium and chromedriver are not installed and could not be installed; run `{' '.join(APT_INSTALL)}`")
    return browser, driver


def _ensure_selenium() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "selenium"], capture_output=True, timeout=600)
        if done.returncode != 0:
            pytest.skip("the selenium package is missing and `pip install selenium` failed")


@contextmanager
def chromium_driver(width: int = 1280, height: int = 800) -> Iterator[object]:
    """A selenium Chrome driver on headless Chromium with a fresh profile; quit afterwards."""
    browser, driver_path = _ensure_chromium()
    _ensure_selenium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sam3dgs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: object) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the visible page."""
    png = driver.get_screenshot_as_png()  # type: ignore[attr-defined]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def assert_not_blank(img: np.ndarray) -> None:
    """A page that rendered something: many colours and real contrast, not one flat fill."""
    flat = img.reshape(-1, 3)
    n_colours = len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0))
    assert img.std() > 8.0, f"screenshot is nearly uniform (std {img.std():.1f})"
    assert n_colours > 50, f"screenshot has only {n_colours} colours"


def colour_pixels(img: np.ndarray, colour: str) -> int:
    """How many pixels are clearly red / green / blue (the fixture's object colours)."""
    r, g, b = (img[..., i].astype(np.int16) for i in range(3))
    if colour == "red":
        sel = (r > 150) & (g < 110) & (b < 110)
    elif colour == "green":
        sel = (g > 130) & (r < 120) & (b < 130)
    else:
        sel = (b > 150) & (r < 110) & (g < 140)
    return int(sel.sum())
