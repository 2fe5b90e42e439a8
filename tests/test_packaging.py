"""The library's core installs and imports with its own dependencies only (no redis-py,
no FastAPI, no tools), in a virtual environment of its own."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import engine
from engine import EngineSettings, SessionEngine
assert "redis" not in sys.modules, "the core imported redis-py"
assert "fastapi" not in sys.modules, "the core imported FastAPI"
SessionEngine(EngineSettings(url="redis://127.0.0.1:1"))  # builds; no I/O in __init__
try:
    from engine.testing import LocalCluster
except ImportError as exc:
    assert "redis" in str(exc), exc
else:
    raise AssertionError("redis-py is installed in the core-only venv")
print("core ok")
"""


def _run_in(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in that venv's Python, the checkout on its path, nothing else around."""
    return subprocess.run(
        [str(python), "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _pip(python: Path, *packages: str) -> None:
    quiet = ("-q", "--disable-pip-version-check")
    subprocess.run(
        [str(python), "-m", "pip", "install", *quiet, *packages], check=True, timeout=300
    )


def test_the_core_imports_with_only_its_declared_dependencies(tmp_path: Path) -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    _pip(python, *deps)
    out = _run_in(python, CHECK, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "core ok" in out.stdout
    # pytest loads the plugin wherever the package is installed: without redis-py too.
    _pip(python, "pytest")
    code = "import sys, engine.testing.plugin; assert 'redis' not in sys.modules"
    plugin = _run_in(python, code, tmp_path)
    assert plugin.returncode == 0, plugin.stderr
