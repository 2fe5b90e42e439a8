"""Shared fixtures: one real six-node cluster for the whole run, one plain server.

* ``cluster_url``: the plugin's ``redis_cluster`` (engine/testing/plugin.py): a
  ``LocalCluster`` (3 primaries + 3 replicas) started once per test run, or the cluster at
  ``ENGINE_TEST_REDIS_URL`` when that is set. Tests that kill, pause
  or fail over nodes must start their own ``LocalCluster`` instead.
* ``standalone``: one plain (non-cluster) ``redis-server`` started once per run.
* ``backend_url``: parametrised over both, for the basic suite that must pass on each.
* ``engine`` / ``engine_on``: an open ``SessionEngine`` with a key prefix unique to the
  test; at teardown every key under that prefix is deleted on every primary, so tests
  never see each other's data and a shared cluster is left as it was found.
* ``ENGINE_TEST_BACKEND=docker`` starts the cluster with testcontainers when a Docker
  daemon answers (there is none on our CI machines; the local processes are the default).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from helpers import open_engine

from engine import SessionEngine
from engine.testing import LocalCluster


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run the async tests on uvloop, as production does."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux/macOS dependency
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def _docker_cluster() -> Iterator[str]:  # pragma: no cover - needs a Docker daemon
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    image = os.environ.get("ENGINE_TEST_DOCKER_IMAGE", "grokzen/redis-cluster:7.0.10")
    container = DockerContainer(image).with_env("IP", "0.0.0.0")
    for port in range(7000, 7006):
        container = container.with_bind_ports(port, port)
    with container:
        wait_for_logs(container, "Cluster state changed: ok", timeout=60)
        yield "redis://127.0.0.1:7000"


@pytest.fixture(scope="session")
def cluster_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the shared six-node cluster: the plugin's ``redis_cluster`` (started once
    for the whole run, or ENGINE_TEST_REDIS_URL), or a Docker one on request."""
    if os.environ.get("ENGINE_TEST_BACKEND") == "docker":
        yield from _docker_cluster()
        return
    yield request.getfixturevalue("redis_cluster").url


@pytest.fixture(scope="session")
def standalone_url() -> Iterator[str]:
    """URL of one plain redis-server (not the machine's own on 6379: ours, started here)."""
    with LocalCluster(cluster_mode=False) as cl:
        yield cl.url


@pytest.fixture(params=["cluster", "standalone"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Both backends, for the suite that must pass on each."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to this test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def engine(cluster_url: str, prefix: str) -> AsyncIterator[SessionEngine]:
    """An open engine on the shared cluster, with a prefix of its own."""
    async with open_engine(cluster_url, prefix) as eng:
        yield eng


@pytest.fixture
async def engine_any(backend_url: str, prefix: str) -> AsyncIterator[SessionEngine]:
    """An open engine on each backend in turn (cluster, then one plain server)."""
    async with open_engine(backend_url, prefix) as eng:
        yield eng


@pytest.fixture
def make_engine(cluster_url: str, prefix: str) -> Callable[..., Any]:
    """``async with make_engine(idle_ttl=1, ...) as eng`` for tests that need settings."""

    def factory(**fields: Any) -> Any:
        return open_engine(fields.pop("url", cluster_url), prefix, **fields)

    return factory
