"""Headless Chromium (Debian's ``chromium`` package) to render local HTML files in tests.

``render_html(path)`` returns the DOM after rendering (``--dump-dom``), so a
test checks what a reviewer's browser shows; ``screenshot(path, png)`` writes a
PNG. Chromium runs with no network use and a throwaway profile directory.
The test command (scripts/test) installs the package when it is missing.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from collections.abc import Callable

import pytest

_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _binary() -> str | None:
    for path in _CANDIDATES:
        if pathlib.Path(path).exists():
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    path = _binary()
    if path is None:
        pytest.fail("chromium is not installed: run ./scripts/test (or apt-get install chromium)")
    return path


@pytest.fixture
def render_html(
    chromium_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., str]:
    """Render a local HTML file headless; returns the DOM Chromium built from it."""

    def run(path: pathlib.Path, *extra: str) -> str:
        profile = tmp_path_factory.mktemp("chromium-profile")
        args = [
            chromium_binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *extra,
            pathlib.Path(path).resolve().as_uri(),
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise AssertionError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    return run


@pytest.fixture
def dump_dom(render_html: Callable[..., str]) -> Callable[[pathlib.Path], str]:
    def run(path: pathlib.Path) -> str:
        return render_html(path, "--dump-dom")

    return run


@pytest.fixture
def screenshot(render_html: Callable[..., str]) -> Callable[[pathlib.Path, pathlib.Path], None]:
    def run(path: pathlib.Path, png: pathlib.Path) -> None:
        render_html(path, f"--screenshot={png}", "--window-size=1400,900")
        assert png.exists() and png.stat().st_size > 0

    return run
