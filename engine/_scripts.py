"""The server-side scripts: read from ``lua/`` once, identified by their SHA1.

Each script is the layout constants (``_keys.lua_layout()``: header offsets and key parts,
named once, in Python), then ``_prelude.lua``, then the script's own file, so helpers are
shared without a Redis function library (which every node of a cluster would have to be
given, and reloaded on after a restart). ``validate`` goes without the prelude: defining
its helper functions costs a closure each per call, measurable on the hot path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ._keys import lua_layout

__all__ = ["SCRIPT_NAMES", "Script", "lua_dir", "scripts"]

_WITHOUT_PRELUDE = frozenset({"validate", "fence"})

SCRIPT_NAMES = (
    "validate",
    "create",
    "update",
    "revoke",
    "revoke_user",
    "rotate",
    "list_user",
    "chat_append",
    "chat_clear",
    "fence",
)


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name, full source and SHA1 (what EVALSHA sends)."""

    name: str
    source: bytes
    sha: bytes


def lua_dir() -> Path:
    """Where the ``.lua`` files are: beside the package in a checkout, inside it when installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "lua", here.parent / "lua"):
        if (candidate / "_prelude.lua").is_file():
            return candidate
    raise FileNotFoundError(f"lua scripts not found next to {here}")


@cache
def scripts() -> dict[str, Script]:
    """All scripts by name, loaded once per process."""
    folder = lua_dir()
    prelude = (folder / "_prelude.lua").read_text()
    out: dict[str, Script] = {}
    for name in SCRIPT_NAMES:
        body = (folder / f"{name}.lua").read_text()
        code = body if name in _WITHOUT_PRELUDE else prelude + "\n" + body
        source = (lua_layout(used_by=code) + code).encode()
        out[name] = Script(name, source, hashlib.sha1(source).hexdigest().encode())
    return out
