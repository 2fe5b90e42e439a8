"""The documentation site: builds with ``mkdocs build --strict``, and its home page renders
in headless Chromium (Debian package ``chromium``) with its title and the theme's styles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TITLE = "redis-session-engine"


def _build(site: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("site")
    _build(path)
    return path


def test_the_generated_pages_hold_what_they_are_generated_from(site: Path) -> None:
    from engine import EngineSettings

    settings = (site / "settings" / "index.html").read_text()
    for name in EngineSettings.model_fields:
        assert f"ENGINE_{name.upper()}" in settings, name
    bench = (site / "benchmarks" / "index.html").read_text()
    assert "python -m engine bench" in bench
    api = (site / "api" / "index.html").read_text()
    assert "validate_many" in api and "admin_router" in api  # from the docstrings


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe is not None
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="no chromium (Debian: apt-get install chromium; scripts/setup.sh installs it)",
)
def test_the_home_page_renders_its_title(site: Path, tmp_path: Path) -> None:
    import matplotlib.image

    home = (site / "index.html").as_uri()
    dom = _chromium("--dump-dom", home, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"<title>{TITLE}</title>" in dom.stdout
    assert f">{TITLE}</h1>" in dom.stdout or f'">{TITLE}<' in dom.stdout

    shot = tmp_path / "home.png"
    out = _chromium(
        f"--screenshot={shot}", "--window-size=1280,900", home, profile=tmp_path / "profile"
    )
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1280)
    # The theme's stylesheet applied: Material's coloured header bar across the top, a
    # white page below it (an unstyled page would be white at the top too).
    header = pixels[10:40, 300:1000, :3].mean(axis=(0, 1))
    body = pixels[600:800, 1000:1200, :3].mean(axis=(0, 1))
    assert header.mean() < 0.6 < body.mean(), (header, body)
