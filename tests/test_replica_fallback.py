"""Replica fallback (issue 13, item 3): validations that survive a primary's death.

Each test runs a cluster of its own (they pause or kill primaries).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from helpers import open_engine

from engine import EngineUnavailable, SessionEngine
from engine._keys import slot_of_tag
from engine.cli.drill import run_drill
from engine.testing import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.drill]


async def replicas_known(eng: SessionEngine, token: str) -> None:
    """Redis lists a replica in CLUSTER SLOTS only once it has replicated something
    (offset > 0, learnt by gossip): refresh the slot map until the shard's replica shows."""
    slot = slot_of_tag(token.split(".", 1)[0])
    deadline = time.monotonic() + 15
    while not eng.transport.replicas_of(slot):
        assert time.monotonic() < deadline, "the replica never appeared in CLUSTER SLOTS"
        eng.transport.request_refresh()
        await asyncio.sleep(0.2)


@pytest.fixture
def cl() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


async def test_a_paused_primary_is_read_from_its_replica_and_revokes_stay_dead(
    cl: LocalCluster, prefix: str
) -> None:
    """wait_replicas=1 covers the shard's one replica: a revoke acknowledged before the
    primary stopped answering is seen by the replica, a live session is still live."""
    fields = {"wait_replicas": 1, "command_timeout": 0.5, "replica_fallback_after": 0.05}
    async with open_engine(cl.url, prefix, **fields) as eng:
        live = await eng.create(user_id="u1", data={"v": 1})
        dead = await eng.create(user_id="u1")
        assert await eng.revoke(dead.token) is True  # acknowledged by the replica (WAIT 1)
        await replicas_known(eng, live.token)
        tag = live.token.split(".", 1)[0]
        primary = cl.primary_for_key(eng.keys.session(tag, live.session.session_id))
        assert slot_of_tag(tag) in {s for a, b in primary.slots for s in range(a, b + 1)}
        cl.pause(primary.port)
        try:
            t0 = time.monotonic()
            session = await eng.validate(live.token)
            took = time.monotonic() - t0
            assert session is not None and session.data == {"v": 1}
            assert took < 0.4, f"the replica answered after {took:.3f}s"
            assert await eng.validate(dead.token) is None
            with pytest.raises(EngineUnavailable):  # writes keep failing: no fallback
                await eng.update(live.token, data={"v": 2})
        finally:
            cl.resume(primary.port)


async def test_without_the_setting_a_paused_primary_fails_closed(
    cl: LocalCluster, prefix: str
) -> None:
    async with open_engine(cl.url, prefix, command_timeout=0.3) as eng:
        live = await eng.create(user_id="u1")
        tag = live.token.split(".", 1)[0]
        primary = cl.primary_for_key(eng.keys.session(tag, live.session.session_id))
        cl.pause(primary.port)
        try:
            with pytest.raises(EngineUnavailable):
                await eng.validate(live.token)
        finally:
            cl.resume(primary.port)


async def test_no_replica_either_fails_closed(cl: LocalCluster, prefix: str) -> None:
    fields = {"command_timeout": 0.4, "replica_fallback_after": 0.05}
    async with open_engine(cl.url, prefix, **fields) as eng:
        live = await eng.create(user_id="u1")
        await replicas_known(eng, live.token)
        tag = live.token.split(".", 1)[0]
        primary = cl.primary_for_key(eng.keys.session(tag, live.session.session_id))
        replica = next(n for n in cl.replicas() if n.master_id == primary.node_id)
        cl.pause(primary.port)
        cl.pause(replica.port)
        try:
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailable):
                await eng.validate(live.token)
            assert time.monotonic() - t0 < 1.0  # within the deadline, never a hang
        finally:
            cl.resume(replica.port)
            cl.resume(primary.port)
        await asyncio.sleep(0)


async def test_kill_primary_drill_with_fallback_keeps_validations_up(cl: LocalCluster) -> None:
    report = await run_drill(
        "kill-primary",
        cl,
        sessions=5000,
        rate=1500,
        wait_replicas=1,
        settle=1.5,
        replica_fallback_after=0.05,
    )
    print(report.summary())
    assert report.validate_error_window_s <= 1.0, report.summary()
    assert report.resurrected == 0 and report.lost_creates == 0
    assert report.failed_other == 0
    # Writes have no fallback: they keep the promotion window.
    assert report.failed_victim > report.failed_victim_validations
