"""The least-privilege ACL user: the rule of ``engine._acl`` (printed by ``python -m engine
acl``) is enough for the whole contract on a real TLS cluster, and one permission less
gives a ``PermissionDenied`` naming it, at ``open()`` or at the first call, never a hang.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    EngineSettings,
    NewSession,
    PermissionDenied,
    ReplicationIncomplete,
    SessionEngine,
)
from engine._acl import (
    BASE,
    FEATURES,
    acl_setuser_args,
    format_acl_setuser,
    permissions,
    script_commands,
)
from engine._scripts import SCRIPT_NAMES, scripts
from engine.testing import LocalCluster

USER, PASSWORD, PREFIX = "engine", "acl-test-password", "aclt"
CONTRACT_FEATURES = ("sessions", "chat", "wait_replicas")


@pytest.fixture(scope="module")
def cl() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1, tls=True) as cluster:
        yield cluster


def set_user(cl: LocalCluster, args: list[str]) -> None:
    """ACL users are per node: the same rule on every node, replicas included."""
    for node in cl.nodes:
        assert cl.run(node.port, "ACL", "SETUSER", *args) in ("OK", b"OK", True)


def engine_as_user(cl: LocalCluster, **fields: Any) -> SessionEngine:
    settings = EngineSettings(
        url=cl.url,
        tls_ca_file=str(cl.ca_file),
        username=USER,
        password=PASSWORD,
        key_prefix=PREFIX,
        command_timeout=1.0,
        **fields,
    )
    return SessionEngine(settings)


# -- the table ---------------------------------------------------------------------------


def test_every_script_belongs_to_a_feature() -> None:
    covered = {s for f in FEATURES.values() for s in f.scripts}
    assert covered == set(SCRIPT_NAMES)


def test_script_commands_are_read_from_the_sources() -> None:
    for name in SCRIPT_NAMES:
        source = scripts()[name].source.decode()
        calls = re.findall(r"redis\.p?call\(\s*'([A-Z]+)'", source)
        assert set(script_commands(name)) == {c.lower() for c in calls}
    assert "time" in script_commands("validate")  # deadlines use the server's clock


def test_the_readme_shows_the_rule_the_command_prints() -> None:
    """The README's example had gone stale (no +append, +rename) when the scripts changed."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = [line for line in readme.splitlines() if line.startswith("ACL SETUSER engine ")]
    assert shown == [format_acl_setuser("engine", "se", ("sessions", "chat")).splitlines()[0]]


def test_the_rule_is_least_privilege_and_keyed_to_the_prefix() -> None:
    perms = permissions("app", ["sessions"])
    assert perms.key_patterns == ("app:*",)
    assert perms.channels == ()
    assert "wait" not in perms.commands and "lrange" not in perms.commands
    assert set(BASE.commands) <= set(perms.commands)
    args = acl_setuser_args("u", "app", ["sessions"])
    assert args.index("-@all") < min(i for i, a in enumerate(args) if a.startswith("+"))
    assert not any(a in ("+@all", "allkeys", "~*", "allchannels") for a in args)
    cache = permissions("app", ["local_cache"])
    assert {"client|id", "client|tracking", "cluster|info", "subscribe", "ping"} <= set(
        cache.commands
    )
    assert cache.channels == ("__redis__:invalidate",)
    events = permissions("app", ["events"])
    assert events.channels == ("__keyspace@0__:app:{*}:s:*",)  # literal, as PSUBSCRIBE needs
    with pytest.raises(ValueError, match="unknown feature"):
        permissions("app", ["replica-fallback"])


def test_cli_prints_the_rule() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine", "acl", "--prefix", "app", "--features", "sessions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == format_acl_setuser("engine", "app", ["sessions"])
    assert "~app:*" in out.stdout and "+evalsha" in out.stdout


def test_redis_accepts_the_rule_with_every_feature(cl: LocalCluster) -> None:
    set_user(cl, acl_setuser_args("every-feature", PREFIX, list(FEATURES), password="x"))
    rules = cl.run(cl.ports[0], "ACL", "GETUSER", "every-feature")
    assert "+client|tracking" in str(rules) and "__redis__:invalidate" in str(rules)


# -- the contract as that user -------------------------------------------------------------


async def test_the_whole_contract_runs_as_the_least_privilege_user(cl: LocalCluster) -> None:
    set_user(cl, acl_setuser_args(USER, PREFIX, CONTRACT_FEATURES, password=PASSWORD))
    async with engine_as_user(cl, wait_replicas=1, wait_timeout=2.0) as eng:
        assert await eng.ping() == 3
        new = await eng.create(user_id="alice", data={"n": 1})
        other = await eng.create(user_id="alice")
        assert (await eng.validate(new.token)) is not None
        updated = await eng.update(new.token, data={"n": 2})
        assert updated.data == {"n": 2}
        rotated = await eng.rotate(new.token)
        assert await eng.validate(new.token) is None
        many = await eng.validate_many([rotated.token, other.token, "not-a-token"] * 20)
        assert sum(s is not None for s in many) == 40
        assert len(await eng.list_user_sessions("alice")) == 2
        assert await eng.chat_append("alice", "room", {"text": "hi"}) == 1
        assert len(await eng.chat_history("alice", "room")) == 1
        await eng.chat_clear("alice", "room")
        assert await eng.revoke(other.token) is True
        stats = await eng.stats()
        assert stats.primaries == 3 and stats.active_sessions >= 1
        assert await eng.revoke_user("alice") == 1
        assert await eng.validate(rotated.token) is None


async def test_local_cache_and_events_run_as_the_least_privilege_user(cl: LocalCluster) -> None:
    """The local cache (tracking, subscriber, probes) and events, with their features only."""
    from engine._events import REQUIRED_FLAGS

    for node in cl.nodes:
        cl.run(node.port, "CONFIG", "SET", "notify-keyspace-events", REQUIRED_FLAGS)
    set_user(
        cl, acl_setuser_args(USER, PREFIX, ["sessions", "local_cache", "events"], password=PASSWORD)
    )
    async with engine_as_user(cl, local_cache_size=100) as eng:
        cache = eng._cache
        assert cache is not None
        async with eng.events() as events:
            new = await eng.create(user_id="carol")
            event = await asyncio.wait_for(events.__anext__(), 10)
            assert event.kind == "created" and event.user_id == "carol"
        for _ in range(300):  # tracking is set up in the background: hits come once it is
            assert await eng.validate(new.token) is not None
            if cache.hits:
                break
            await asyncio.sleep(0.02)
        assert cache.hits, "no local hit as the least-privilege user"
        assert not any(t.refused for t in cache.trackers.values())
        await asyncio.sleep(3 * cache.probe_period)  # probes (PING, CLUSTER INFO) pass too
        assert all(t.ready for t in cache.trackers.values())
        await eng.revoke_user("carol")


# -- one permission less -------------------------------------------------------------------


async def _first_failure(cl: LocalCluster, **fields: Any) -> BaseException:
    """Open and run the contract until something raises; bounded, so a hang fails."""
    eng = engine_as_user(cl, **fields)

    async def contract() -> None:
        await eng.open()
        new = await eng.create(user_id="bob")
        await eng.validate(new.token)
        await eng.validate_many([new.token])
        await eng.chat_append("bob", "room", {"text": "hi"})
        await eng.chat_history("bob", "room")
        await eng.stats()
        await eng.revoke_user("bob")

    try:
        await asyncio.wait_for(contract(), timeout=10)
    except Exception as exc:
        return exc
    finally:
        await eng.aclose()
    raise AssertionError("the contract ran without the permission")


@pytest.mark.parametrize(
    ("missing", "where"),
    [
        ("ping", "handshake"),  # at open(): every connection's handshake
        ("cluster|slots", "CLUSTER SLOTS"),  # at open(): not mistaken for a plain server
        ("script|load", "SCRIPT LOAD"),  # at open()
        ("evalsha", "create"),  # the first call
        ("time", "create"),  # refused inside a script: named from the script's source
        ("append", "create"),
        ("rpush", "chat_append"),
        ("lrange", "chat_history"),
        ("info", "INFO"),  # stats()
    ],
)
async def test_a_missing_permission_is_named(cl: LocalCluster, missing: str, where: str) -> None:
    args = acl_setuser_args(USER, PREFIX, ("sessions", "chat"), password=PASSWORD)
    args.remove(f"+{missing}")
    set_user(cl, args)
    failure = await _first_failure(cl)
    assert isinstance(failure, PermissionDenied), repr(failure)
    assert failure.permission == missing
    assert str(failure).startswith(where) and f"'{missing}'" in str(failure)


async def test_keys_outside_the_prefix_are_named(cl: LocalCluster) -> None:
    set_user(cl, acl_setuser_args(USER, "elsewhere", ("sessions", "chat"), password=PASSWORD))
    failure = await _first_failure(cl)
    assert isinstance(failure, PermissionDenied), repr(failure)
    assert failure.permission == "keys"


async def test_a_missing_wait_says_so_with_the_write_kept(cl: LocalCluster) -> None:
    # WAIT runs after the write: the write happened, so the result travels with the error.
    set_user(cl, acl_setuser_args(USER, PREFIX, ("sessions",), password=PASSWORD))
    async with engine_as_user(cl, wait_replicas=1) as eng:
        with pytest.raises(ReplicationIncomplete, match=r"NOPERM.*'wait'") as failed:
            await eng.create(user_id="carol")
        kept = failed.value.result
        assert isinstance(kept, NewSession)
        assert await eng.validate(kept.token) is not None
        with pytest.raises(ReplicationIncomplete):  # every write says so, deletes too
            await eng.revoke_user("carol")


@pytest.mark.parametrize("granted", [True, False])
async def test_select_db_feature_on_a_plain_server(granted: bool) -> None:
    features = ("sessions", "select_db") if granted else ("sessions",)
    with LocalCluster(cluster_mode=False) as server:
        server.run(server.ports[0], "ACL", "SETUSER", *acl_setuser_args(USER, PREFIX, features))
        server.run(server.ports[0], "ACL", "SETUSER", USER, ">pw")
        url = f"redis://{USER}:pw@{server.host}:{server.ports[0]}/2"
        eng = SessionEngine(EngineSettings(url=url, key_prefix=PREFIX))
        try:
            if granted:
                await eng.open()
                assert await eng.validate((await eng.create(user_id="db")).token) is not None
                assert server.run(server.ports[0], "DBSIZE") == 0  # the keys are in db 2
            else:
                with pytest.raises(PermissionDenied) as denied:
                    await asyncio.wait_for(eng.open(), 10)
                assert denied.value.permission == "select"
        finally:
            await eng.aclose()
