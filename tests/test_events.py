"""SessionEngine.events(): keyspace notifications from every primary, through a failover.

Each test starts a cluster of its own: the events need ``notify-keyspace-events`` set on
every node (CONFIG SET from the test), and one test kills a primary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from engine import (
    EngineError,
    EngineSettings,
    EventsUnavailable,
    SessionEngine,
    SessionEvent,
    SessionEventKind,
    SessionEventStream,
)
from engine._events import REQUIRED_FLAGS
from engine._keys import key_slot
from engine.testing import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.drill]

CREATED, ROTATED, REVOKED, EXPIRED, EVICTED = (
    SessionEventKind.CREATED,
    SessionEventKind.ROTATED,
    SessionEventKind.REVOKED,
    SessionEventKind.EXPIRED,
    SessionEventKind.EVICTED,
)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1) as cl:
        for port in cl.ports:  # replicas too: they become primaries
            cl.run(port, "CONFIG", "SET", "notify-keyspace-events", REQUIRED_FLAGS)
        yield cl


@pytest.fixture
async def engine(cluster: LocalCluster) -> AsyncIterator[SessionEngine]:
    settings = EngineSettings(url=cluster.url, key_prefix="ev", command_timeout=2.0)
    async with SessionEngine(settings) as eng:
        yield eng


async def _next(stream: SessionEventStream, wait: float = 10.0) -> SessionEvent:
    return await asyncio.wait_for(stream.__anext__(), wait)


async def _collect(stream: SessionEventStream, count: int) -> list[SessionEvent]:
    return [await _next(stream) for _ in range(count)]


def _users_on_every_primary(eng: SessionEngine, cl: LocalCluster) -> list[str]:
    """One user id per primary (their keys live on that primary)."""
    found: dict[int, str] = {}
    for i in range(1000):
        user = f"user-{i}"
        port = cl.primary_for_key(eng.keys.base(eng.keys.user_tag(user))).port
        found.setdefault(port, user)
        if len(found) == len(cl.primaries()):
            return list(found.values())
    raise AssertionError("no user found for some primary")


async def test_every_kind_from_every_primary(engine: SessionEngine, cluster: LocalCluster) -> None:
    users = _users_on_every_primary(engine, cluster)
    async with engine.events() as stream:
        assert len(stream.subscribed) == 3
        made = [await engine.create(user_id=u, data={"n": 1}) for u in users]
        events = await _collect(stream, 3)
        # A set: each primary's events come on a socket of their own, so the order across
        # primaries is the order the sockets are read in, not the order of the writes.
        assert {(e.kind, e.session_id, e.user_id) for e in events} == {
            (CREATED, n.session.session_id, u) for n, u in zip(made, users, strict=True)
        }

        await engine.update(made[0].token, data={"n": 2})  # an update is not an event
        await engine.validate(made[0].token)  # nor a refresh
        rotated = await engine.rotate(made[0].token)
        (event,) = await _collect(stream, 1)
        assert event.kind is ROTATED and event.user_id == users[0]
        assert event.session_id == made[0].session.session_id
        assert event.new_session_id == rotated.session.session_id

        await engine.revoke(rotated.token)
        await engine.revoke_user(users[1])
        events = await _collect(stream, 2)
        assert {(e.kind, e.session_id, e.user_id) for e in events} == {
            (REVOKED, rotated.session.session_id, users[0]),  # remembered from the rotation
            (REVOKED, made[1].session.session_id, users[1]),
        }

        short = await engine.create(user_id=users[2], idle_ttl=1)
        assert (await _next(stream)).kind is CREATED
        event = await _next(stream, wait=15)
        assert (event.kind, event.session_id) == (EXPIRED, short.session.session_id)
        assert event.user_id == users[2]

        # maxmemory: a node evicts the session under memory pressure.
        base = engine.keys.base(engine.keys.user_tag(users[2]))
        port = cluster.primary_for_key(base).port
        cluster.run(port, "CONFIG", "SET", "maxmemory-policy", "allkeys-random")
        cluster.run(port, "CONFIG", "SET", "maxmemory", "1")
        try:
            with pytest.raises(Exception, match="maxmemory"):
                cluster.run(port, "SET", f"{base}filler", "x")
        finally:
            cluster.run(port, "CONFIG", "SET", "maxmemory", "0")
        event = await _next(stream)
        assert (event.kind, event.session_id) == (EVICTED, made[2].session.session_id)
        assert stream.dropped == 0


async def test_missing_flags_are_named_at_start(
    engine: SessionEngine, cluster: LocalCluster
) -> None:
    port = cluster.primaries()[1].port
    cluster.run(port, "CONFIG", "SET", "notify-keyspace-events", "Kg")
    with pytest.raises(EventsUnavailable) as raised:
        async with engine.events():
            pass
    text = str(raised.value)
    assert f":{port}" in text and "'$xe'" in text and "CONFIG SET" in text
    # "A" stands for all the classes the events need.
    cluster.run(port, "CONFIG", "SET", "notify-keyspace-events", "KA")
    async with engine.events() as stream:
        assert len(stream.subscribed) == 3


async def test_events_after_a_failover_come_from_the_promoted_replica(
    engine: SessionEngine, cluster: LocalCluster
) -> None:
    users = _users_on_every_primary(engine, cluster)
    victim_user = users[0]
    base = engine.keys.base(engine.keys.user_tag(victim_user))
    old = cluster.primary_for_key(base)
    async with engine.events() as stream:
        before = await engine.create(user_id=victim_user)
        assert (await _next(stream)).session_id == before.session.session_id

        await asyncio.to_thread(cluster.kill, old.port)
        # While the dead primary's slots wait for their replica, the other primaries'
        # events keep coming: one subscription per primary, none shared.
        during = [await engine.create(user_id=u) for u in users[1:]]
        events = await _collect(stream, 2)
        assert {e.session_id for e in events} == {n.session.session_id for n in during}
        await asyncio.to_thread(cluster.wait_healthy, 30.0)
        new = await asyncio.to_thread(cluster.primary_for_key, base)
        assert new.port != old.port
        # The stream drops the dead node and subscribes the promoted replica by itself.
        deadline = time.monotonic() + 20
        while f"127.0.0.1:{new.port}" not in stream.subscribed:
            assert time.monotonic() < deadline, stream.subscribed
            await asyncio.sleep(0.1)
        assert f"127.0.0.1:{old.port}" not in stream.subscribed
        assert len(stream.subscribed) == 3
        # Drain what the failover let through (at most once: maybe nothing at all).
        while True:
            try:
                await _next(stream, wait=0.5)
            except TimeoutError:
                break

        # Everything after the re-subscription is delivered, from every primary.
        after = [await engine.create(user_id=u) for u in users]
        events = await _collect(stream, 3)
        assert {(e.kind, e.session_id) for e in events} == {
            (CREATED, n.session.session_id) for n in after
        }
        assert key_slot(base) in range(16384)
        await engine.revoke(after[0].token)
        event = await _next(stream)
        assert (event.kind, event.session_id, event.user_id) == (
            REVOKED,
            after[0].session.session_id,
            victim_user,
        )


async def test_closing_ends_the_iteration_and_is_safe_twice(engine: SessionEngine) -> None:
    stream = engine.events()
    await stream.start()
    waiter = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5)
    await stream.aclose()
    with pytest.raises(ValueError, match="max_queue"):
        engine.events(max_queue=0)


async def test_closing_the_engine_ends_the_stream_with_a_clear_error(
    cluster: LocalCluster,
) -> None:
    eng = await SessionEngine(EngineSettings(url=cluster.url, key_prefix="ev")).open()
    stream = await eng.events().start()
    await eng.aclose()
    with pytest.raises(EngineError, match="not open"):
        await asyncio.wait_for(stream.__anext__(), 5)
    await stream.aclose()
