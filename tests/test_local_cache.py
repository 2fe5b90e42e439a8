"""The local cache (issue 12): every line of its contract, against real servers.

Two engines on one cluster: ``b`` caches, ``a`` (or a plain redis-py client) changes
things. "Seen" means ``b`` stops serving the old answer; the bound tested is 50 ms of
polling (the invalidation crosses one loopback connection).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis
from helpers import open_engine

from engine import EngineSettings, EngineUnavailable, SessionEngine, SessionState
from engine._keys import slot_of_tag
from engine._local_cache import LocalCache
from engine.testing import LocalCluster, until_tracking_ready

pytestmark = pytest.mark.cluster

CACHED: dict[str, Any] = {"local_cache_size": 1000, "local_cache_max_staleness": 0.5}


def cache_of(eng: SessionEngine) -> LocalCache:
    cache = eng._cache
    assert cache is not None
    return cache


async def cached(eng: SessionEngine, token: str) -> None:
    """Validate until the answer comes from the local cache."""
    hits = cache_of(eng).hits
    for _ in range(200):
        assert await eng.validate(token) is not None
        if cache_of(eng).hits > hits:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session never got into the local cache")


async def seen_within(check: Callable[[], Awaitable[bool]], bound: float = 0.05) -> float:
    """Poll ``check`` until true; the time it took, which must be within ``bound``."""
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < bound, f"not seen within {bound * 1000:.0f} ms"
        await asyncio.sleep(0.001)
    return time.monotonic() - t0


@asynccontextmanager
async def pair(url: str, prefix: str, **b_fields: Any) -> AsyncIterator[tuple[Any, Any]]:
    async with open_engine(url, prefix) as a:
        settings = EngineSettings(url=url, key_prefix=prefix, **{**CACHED, **b_fields})
        async with SessionEngine(settings) as b:
            await until_tracking_ready(b)
            yield a, b


def raw_client(url: str) -> redis.RedisCluster:
    return redis.RedisCluster.from_url(url)


# -- tracking of the script's reads, and every kind of change --------------------------


@pytest.mark.parametrize("command", ["DEL", "SET", "PEXPIRE"])
async def test_keys_read_inside_the_validate_script_are_tracked(
    cluster_url: str, prefix: str, command: str
) -> None:
    """The only read of the key on b's connection is inside the validate script; another
    client's write of it after that read must produce an invalidation."""
    async with pair(cluster_url, prefix) as (a, b):
        new = await a.create(user_id="u1")
        await cached(b, new.token)
        key = b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
        before = cache_of(b).invalidations
        args = {"DEL": (), "SET": (b"garbage",), "PEXPIRE": (60_000,)}[command]
        await asyncio.to_thread(raw_client(cluster_url).execute_command, command, key, *args)

        async def dropped() -> bool:
            return cache_of(b).invalidations > before and key not in cache_of(b).entries

        await seen_within(dropped)


@pytest.mark.parametrize(
    "kind", ["revoke", "revoke_user", "rotate", "update", "state", "expiry", "pexpire_by_other"]
)
async def test_any_change_anywhere_is_seen_within_50ms(
    cluster_url: str, prefix: str, kind: str
) -> None:
    async with pair(cluster_url, prefix) as (a, b):
        new = await a.create(user_id="u1", data={"v": 1})
        token = new.token
        await cached(b, token)
        key = b.keys.session(token.split(".", 1)[0], new.session.session_id)
        if kind == "revoke":
            await a.revoke(token)
        elif kind == "revoke_user":
            await a.revoke_user("u1")
        elif kind == "rotate":
            await a.rotate(token)
        elif kind == "update":
            await a.update(token, data={"v": 2})
        elif kind == "state":
            await a.update(token, state=SessionState.LOCKED)
        elif kind in ("expiry", "pexpire_by_other"):
            # The key's TTL cut short by another client: the change (and then the expiry
            # itself) must reach b.
            ms = 30 if kind == "expiry" else 1
            await asyncio.to_thread(raw_client(cluster_url).pexpire, key, ms)
            await asyncio.sleep(0.05)

        async def changed() -> bool:
            s = await b.validate(token)
            return s is None or s.data != {"v": 1}

        await seen_within(changed)
        if kind == "update":
            s = await b.validate(token)
            assert s is not None and s.data == {"v": 2}


async def test_a_refresh_by_another_process_drops_the_entry(cluster_url: str, prefix: str) -> None:
    # b keeps entries while the TTL is above 90% of idle (slack 0.1); a refreshes below 99%.
    async with open_engine(cluster_url, prefix, refresh_slack=0.01) as a:
        settings = EngineSettings(url=cluster_url, key_prefix=prefix, refresh_slack=0.1, **CACHED)
        async with SessionEngine(settings) as b:
            await until_tracking_ready(b)
            new = await a.create(user_id="u1", idle_ttl=100)
            key = b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
            await asyncio.to_thread(raw_client(cluster_url).pexpire, key, 95_000)
            await cached(b, new.token)
            before = cache_of(b).invalidations
            refreshed = await a.validate(new.token)  # pttl 95 s < 99 s: a rewrites the TTL
            assert refreshed is not None

            async def dropped() -> bool:
                return cache_of(b).invalidations > before and key not in cache_of(b).entries

            await seen_within(dropped)
            again = await b.validate(new.token)
            # The refreshed deadline (100 s), not the cut one (95 s): expires_at is the
            # local clock + the server's PTTL, so two reads differ by their latency.
            assert again is not None
            assert again.expires_at >= refreshed.expires_at - timedelta(seconds=1)


async def test_another_process_sees_a_revocation_within_50ms(
    cluster_url: str, prefix: str, tmp_path: Any
) -> None:
    """b runs in a process of its own: it caches the token, says so, and polls."""
    async with open_engine(cluster_url, prefix) as a:
        new = await a.create(user_id="u1")
        script = textwrap.dedent(
            f"""
            import asyncio, json, sys, time
            from engine import EngineSettings, SessionEngine
            async def main():
                s = EngineSettings(url={cluster_url!r}, key_prefix={prefix!r},
                                   local_cache_size=100)
                async with SessionEngine(s) as b:
                    for _ in range(500):
                        assert await b.validate({new.token!r}) is not None
                        if b._cache.hits:
                            break
                        await asyncio.sleep(0.01)
                    print("cached", flush=True)
                    end = time.monotonic() + 5
                    while time.monotonic() < end:
                        if await b.validate({new.token!r}) is None:
                            print(json.dumps({{"gone_at": time.time(),
                                               "hits": b._cache.hits}}), flush=True)
                            return
                        await asyncio.sleep(0.001)
                    print("never", flush=True)
            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.decode().strip() == "cached", line
            await a.revoke(new.token)
            revoked_at = time.time()
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            result = json.loads(line)
            assert result["hits"] > 0
            assert result["gone_at"] - revoked_at < 0.05
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_own_writes_are_seen_at_once(make_engine: Any) -> None:
    async with make_engine(**CACHED) as eng:
        await until_tracking_ready(eng)
        new = await eng.create(user_id="u1", data={"v": 1})
        await cached(eng, new.token)
        await eng.update(new.token, data={"v": 2})
        s = await eng.validate(new.token)  # no sleep: read-your-writes
        assert s is not None and s.data == {"v": 2}
        await cached(eng, new.token)
        await eng.revoke_user("u1")
        assert await eng.validate(new.token) is None


async def test_a_cached_session_cannot_be_changed_by_its_caller(make_engine: Any) -> None:
    async with make_engine(**CACHED) as eng:
        await until_tracking_ready(eng)
        new = await eng.create(user_id="u1", data={"cart": [1]})
        await cached(eng, new.token)
        s = await eng.validate(new.token)
        assert s is not None
        s.data["cart"].append(2)
        again = await eng.validate(new.token)
        assert again is not None and again.data == {"cart": [1]}


async def test_states_are_checked_on_a_hit(make_engine: Any) -> None:
    async with make_engine(**CACHED) as eng:
        await until_tracking_ready(eng)
        new = await eng.create(user_id="u1", state=SessionState.PENDING)
        pending = {SessionState.PENDING}
        for _ in range(200):
            assert await eng.validate(new.token, states=pending) is not None
            if cache_of(eng).hits:
                break
            await asyncio.sleep(0.01)
        assert cache_of(eng).hits
        assert await eng.validate(new.token) is None  # ACTIVE only: the cached one is pending
        with pytest.raises(Exception, match="states"):
            await eng.validate(new.token, states=[])


# -- the race: an invalidation that overtakes the reply of the read it concerns --------


class _Gate:
    """Stands in for a connection's reply parser: holds the bytes back until released."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held: list[bytes] = []
        self.holding = True

    def feed(self, data: bytes) -> None:
        if self.holding:
            self.held.append(data)
        else:
            self.real.feed(data)

    def gets(self) -> Any:
        return False if self.holding else self.real.gets()

    def release(self) -> None:
        self.holding = False
        for chunk in self.held:
            self.real.feed(chunk)


async def test_an_invalidation_overtaking_the_read_reply_is_not_cached(
    cluster_url: str, prefix: str
) -> None:
    """Deterministic: b's read runs on the server, its reply is held back on arrival; a
    write lands and its invalidation is processed; then the (old) reply is released."""
    async with pair(cluster_url, prefix) as (a, b):
        new = await a.create(user_id="u1", data={"v": 1})
        slot_node = b.transport.node_for_slot(
            __import__("engine._keys", fromlist=["slot_of_tag"]).slot_of_tag(
                new.token.split(".", 1)[0]
            )
        )
        conn = slot_node.conn
        assert conn is not None
        gate = _Gate(conn._reader)
        conn._reader = gate
        try:
            task = asyncio.create_task(b.validate(new.token))
            while not gate.held:  # noqa: ASYNC110 - the read ran: its reply is here
                await asyncio.sleep(0.001)
            before = cache_of(b).invalidations
            await a.update(new.token, data={"v": 2})
            while cache_of(b).invalidations == before:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        finally:
            gate.release()
            conn._reader = gate.real
            conn.data_received(b"")
        old = await task
        assert old is not None and old.data == {"v": 1}  # true when it was read
        key = b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
        assert key not in cache_of(b).entries
        now = await b.validate(new.token)
        assert now is not None and now.data == {"v": 2}


# -- expiry: sliding and absolute, as without the cache --------------------------------


async def test_a_used_session_never_idles_out_while_served_from_cache(
    cluster_url: str, prefix: str
) -> None:
    async with pair(cluster_url, prefix, refresh_slack=0.1) as (a, b):
        new = await a.create(user_id="u1", idle_ttl=1.0, absolute_ttl=60)
        end = time.monotonic() + 2.5  # 2.5 idle periods
        while time.monotonic() < end:
            assert await b.validate(new.token) is not None
            await asyncio.sleep(0.005)
        assert cache_of(b).hits > 0  # served from cache part of the time...
        assert await a.validate(new.token) is not None  # ...and alive in Redis throughout


async def test_never_served_past_the_absolute_deadline(cluster_url: str, prefix: str) -> None:
    async with pair(cluster_url, prefix, refresh_slack=0.1) as (a, b):
        new = await a.create(user_id="u1", idle_ttl=1.5, absolute_ttl=1.5)
        seen_alive = False
        end = time.time() + 2.5
        while time.time() < end:
            asked_at = time.time()
            s = await b.validate(new.token)
            if s is not None:
                seen_alive = True
                # Not past its absolute deadline when asked (ms-granular deadlines; the
                # answer may arrive later on a busy box, but was true when given).
                assert s.absolute_expires_at.timestamp() > asked_at - 0.002
            await asyncio.sleep(0.005)
        assert seen_alive
        assert await b.validate(new.token) is None


# -- validate_many, stats --------------------------------------------------------------


async def test_validate_many_uses_the_cache(cluster_url: str, prefix: str) -> None:
    async with pair(cluster_url, prefix) as (a, b):
        tokens = [(await a.create(user_id=f"u{i}")).token for i in range(20)]
        assert all(await b.validate_many(tokens))
        hits = cache_of(b).hits
        assert all(await b.validate_many(tokens))
        assert cache_of(b).hits - hits == 20
        await a.revoke(tokens[3])

        async def gone() -> bool:
            return (await b.validate_many(tokens))[3] is None

        await seen_within(gone)
        stats = await b.stats()
        assert stats.local_hits >= 20 and stats.local_entries == 19
        assert stats.local_invalidations >= 1 and stats.local_drops["invalidated"] >= 1


async def test_the_cache_is_bounded(make_engine: Any) -> None:
    async with make_engine(local_cache_size=5) as eng:
        await until_tracking_ready(eng)
        tokens = [(await eng.create(user_id=f"u{i}")).token for i in range(12)]
        for _ in range(3):
            await eng.validate_many(tokens)
        stats = await eng.stats()
        assert stats.local_entries == 5 and stats.local_drops["evicted"] >= 7


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="local_cache_size"):
        EngineSettings(local_cache_size=-1)
    with pytest.raises(ValueError, match="local_cache_max_staleness"):
        EngineSettings(local_cache_max_staleness=0)


# -- failures: a paused node, a killed one -------------------------------------------


@pytest.fixture
def own_cluster() -> Any:
    with LocalCluster() as cl:
        yield cl


async def test_a_paused_node_stops_serving_from_cache_then_fails_closed(
    own_cluster: LocalCluster, prefix: str
) -> None:
    staleness = 0.3
    fields = {"local_cache_size": 100, "local_cache_max_staleness": staleness}
    async with open_engine(own_cluster.url, prefix, command_timeout=0.2, **fields) as b:
        await until_tracking_ready(b)
        new = await b.create(user_id="u1")
        await cached(b, new.token)
        node = own_cluster.primary_for_key(
            b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
        )
        own_cluster.pause(node.port)
        paused_at = time.monotonic()
        try:
            served_until = paused_at
            failed = False
            while time.monotonic() - paused_at < 3:
                hits = cache_of(b).hits
                try:
                    await b.validate(new.token)
                except EngineUnavailable:
                    failed = True
                    break
                if cache_of(b).hits > hits:
                    served_until = time.monotonic()
                await asyncio.sleep(0.005)
            assert failed, "a paused node's sessions must fail closed once not served"
            probe = cache_of(b).probe_period
            assert served_until - paused_at <= staleness + probe + 0.05
        finally:
            own_cluster.resume(node.port)
        deadline = time.monotonic() + 10
        while True:  # recovers: from Redis, then from cache again
            try:
                if await b.validate(new.token) is not None and cache_of(b).hits:
                    break
            except EngineUnavailable:
                pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await cached(b, new.token)


async def test_no_entry_from_before_a_failover_is_served_after_it(
    own_cluster: LocalCluster, prefix: str
) -> None:
    async with open_engine(own_cluster.url, prefix, command_timeout=0.5) as a:
        settings = EngineSettings(
            url=own_cluster.url, key_prefix=prefix, command_timeout=0.5, **CACHED
        )
        async with SessionEngine(settings) as b:
            await until_tracking_ready(b)
            seed_port = own_cluster.ports[0]
            for i in range(100):  # a user whose primary is not the seed (teardown uses it)
                new = await a.create(user_id=f"u{i}", data={"v": "before"})
                key = b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
                node = own_cluster.primary_for_key(key)
                if node.port != seed_port:
                    break
            await cached(b, new.token)
            own_cluster.kill(node.port)
            # The old entry is gone with the connection, before anything else is served.
            deadline = time.monotonic() + 2
            while key in cache_of(b).entries:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert cache_of(b).drops["connection"] >= 1
            await asyncio.to_thread(own_cluster.wait_healthy, 30)
            while True:  # a writes on the promoted replica
                try:
                    await a.update(new.token, data={"v": "after"})
                    break
                except EngineUnavailable:
                    await asyncio.sleep(0.1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    s = await b.validate(new.token)
                    assert s is not None and s.data == {"v": "after"}
                    break
                except EngineUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            await cached(b, new.token)
            s = await b.validate(new.token)
            assert s is not None and s.data == {"v": "after"}


async def test_a_lost_invalidation_connection_drops_entries_and_tracking_comes_back(
    cluster_url: str, prefix: str
) -> None:
    """CLIENT KILL of the subscriber: what it would have told us is unknowable, so the
    node's entries go; tracking is set up again on the same data connection (a new
    REDIRECT), and a later change is seen as before."""
    async with pair(cluster_url, prefix) as (a, b):
        new = await a.create(user_id="u1", data={"v": 1})
        await cached(b, new.token)
        key = b.keys.session(new.token.split(".", 1)[0], new.session.session_id)
        tracker = cache_of(b).trackers[b.transport.node_for_slot(cache_of(b).entries[key].slot)]
        sub = tracker._sub
        assert sub is not None
        host, port = tracker.node.host, tracker.node.port
        killed = await asyncio.to_thread(
            redis.Redis(host=host, port=port).execute_command, "CLIENT", "KILL", "ID", sub.client_id
        )
        assert killed == 1
        deadline = time.monotonic() + 2
        while key in cache_of(b).entries:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert cache_of(b).drops["connection"] >= 1
        await until_tracking_ready(b)
        assert tracker._sub is not None and tracker._sub.client_id != sub.client_id
        await cached(b, new.token)
        await a.update(new.token, data={"v": 2})

        async def changed() -> bool:
            s = await b.validate(new.token)
            return s is not None and s.data == {"v": 2}

        await seen_within(changed)


async def test_a_migrated_slot_is_not_served_from_the_old_node(
    own_cluster: LocalCluster, prefix: str
) -> None:
    """The user's slot moves to another primary (CLUSTER SETSLOT + MIGRATE): the entry the
    old node vouched for is not served after the move; b follows MOVED, caches from the new
    node, and sees a change made there."""
    async with pair(own_cluster.url, prefix) as (a, b):
        new = await a.create(user_id="u1", data={"v": 1})
        await cached(b, new.token)
        tag = new.token.split(".", 1)[0]
        key = b.keys.session(tag, new.session.session_id)
        slot = slot_of_tag(tag)
        src = own_cluster.primary_for_key(key)
        dst = next(p for p in own_cluster.primaries() if p.port != src.port)
        run = own_cluster.run

        def migrate() -> None:
            run(dst.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", src.node_id)
            run(src.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.node_id)
            keys = run(src.port, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            run(src.port, "MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
            for p in own_cluster.primaries():
                run(p.port, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)

        await asyncio.to_thread(migrate)
        deadline = time.monotonic() + 2
        while key in cache_of(b).entries:  # MIGRATE deleted it on the old node: invalidated
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        s = await b.validate(new.token)  # MOVED, then the new node
        assert s is not None and s.data == {"v": 1}
        assert b.transport.node_for_slot(slot).port == dst.port
        await until_tracking_ready(b)
        await cached(b, new.token)
        assert cache_of(b).entries[key].tracker.node.port == dst.port
        await a.update(new.token, data={"v": 2})

        async def changed() -> bool:
            got = await b.validate(new.token)
            return got is not None and got.data == {"v": 2}

        await seen_within(changed, bound=0.5)  # a may first follow MOVED itself


async def test_a_plain_server_works_the_same(standalone_url: str, prefix: str) -> None:
    async with pair(standalone_url, prefix) as (a, b):
        new = await a.create(user_id="u1")
        await cached(b, new.token)
        await a.revoke(new.token)

        async def gone() -> bool:
            return await b.validate(new.token) is None

        await seen_within(gone)


async def test_a_tight_loop_of_hits_does_not_starve_the_liveness_probe(
    cluster_url: str, prefix: str
) -> None:
    """Hits never wait for I/O; without an occasional yield a loop of them would keep the
    probes from running, and every entry would go stale ("silent") after max_staleness."""
    async with pair(cluster_url, prefix, local_cache_max_staleness=0.2) as (a, b):
        new = await a.create(user_id="u1")
        await cached(b, new.token)
        end = time.monotonic() + 1.0  # five times the staleness bound, never sleeping
        while time.monotonic() < end:
            assert await b.validate(new.token) is not None
        assert cache_of(b).drops["silent"] == 0
        assert new.token and cache_of(b).misses < 10  # stayed servable throughout
