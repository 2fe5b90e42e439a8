"""pytest plugin (entry point ``pytest11``): a real cluster and an engine for your tests.

Fixtures:

* ``redis_cluster`` (session): a six-node ``LocalCluster`` started once per test run, or
  the cluster at ``--engine-redis-url`` / ``ENGINE_TEST_REDIS_URL`` when given (then only
  its ``url`` is used: nothing is killed or changed). Skips the test, with the reason,
  when neither a URL nor a ``redis-server`` executable is there.
* ``session_engine``: an open ``SessionEngine`` on that cluster with a key prefix of its
  own; every key under the prefix is deleted afterwards, so tests never see each other's
  data and a shared cluster is left as it was found.

Marker ``requires_redis_server``: skip the test when no ``redis-server`` is installed.
``ENGINE_REDIS_SERVER=/path/to/redis-server`` makes the harness run that binary instead of
the one on ``PATH`` (e.g. to run the suite against another Redis version).

A user's test::

    async def test_login(session_engine):
        new = await session_engine.create(user_id="alice")
        assert (await session_engine.validate(new.token)).user_id == "alice"

Nothing heavy is imported until a fixture is used: installing the library without the
``testing`` extra (redis-py) must not break anybody's pytest.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from .._engine import SessionEngine

__all__ = ["redis_cluster", "session_engine"]

URL_VARIABLE = "ENGINE_TEST_REDIS_URL"


class HasURL(Protocol):
    """What the fixtures need of a cluster: where it is."""

    @property
    def url(self) -> str: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("engine", "redis-session-engine")
    group.addoption(
        "--engine-redis-url",
        default=None,
        help=f"run against this cluster instead of a local one (or set {URL_VARIABLE})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_redis_server: skip when no redis-server executable is installed"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_redis_server") and not _have_redis_server():
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")


def _have_redis_server() -> bool:
    from ._processes import redis_server_available  # noqa: PLC0415 - keep the plugin light

    return redis_server_available()


def external_url(config: pytest.Config) -> str | None:
    """The cluster URL given on the command line or in the environment, if any."""
    url = config.getoption("--engine-redis-url", default=None) or os.environ.get(URL_VARIABLE)
    return str(url) if url else None


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[HasURL]:
    """A real Redis Cluster for the whole run (see the module docstring)."""
    url = external_url(request.config)
    if url:
        from ._remote import RemoteCluster  # noqa: PLC0415

        yield RemoteCluster(url)
        return
    if not _have_redis_server():
        pytest.skip(f"no redis-server installed and no {URL_VARIABLE} given")
    from ._cluster import LocalCluster  # noqa: PLC0415

    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        yield cl


def _async_fixture(fn: Any) -> Any:
    """An async fixture in pytest-asyncio's strict mode too (auto mode needs nothing)."""
    try:
        import pytest_asyncio  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the fixture then says what is missing
        return pytest.fixture(fn)
    return pytest_asyncio.fixture(fn)


@_async_fixture
async def session_engine(redis_cluster: HasURL) -> AsyncIterator[SessionEngine]:
    """An open engine with a key prefix of its own; its keys are deleted afterwards."""
    from .. import EngineSettings, SessionEngine  # noqa: PLC0415
    from ._keyspace import delete_prefix  # noqa: PLC0415

    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        async with SessionEngine(EngineSettings(url=redis_cluster.url, key_prefix=prefix)) as eng:
            yield eng
    finally:
        await asyncio.to_thread(delete_prefix, redis_cluster.url, prefix)
