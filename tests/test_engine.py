"""SessionEngine against the real six-node cluster (and the basic suite on a plain server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from helpers import all_keys, all_values
from pydantic import BaseModel

from engine import (
    EngineSettings,
    EngineUnavailable,
    InvalidArgument,
    PayloadTooLarge,
    Session,
    SessionConflict,
    SessionEngine,
    SessionLimitExceeded,
    SessionNotFound,
    SessionState,
    testing,
)
from engine._keys import key_slot
from engine._models import build_session
from engine._tokens import parse_token
from engine.testing import LocalCluster

pytestmark = pytest.mark.cluster


@contextmanager
def sent_commands(eng: SessionEngine) -> Iterator[list[tuple[str, bytes]]]:
    """Record every command the engine writes to any node: (node name, packed command)."""
    sent: list[tuple[str, bytes]] = []
    transport = eng.transport
    originals: dict[Any, Any] = {}
    for node in list(transport._nodes.values()):
        conn = node.conn
        if conn is None:
            continue
        original = conn.send
        originals[conn] = original

        def spy(
            packed: bytes,
            deadline: float,
            prefix: bytes | None = None,
            _o: Any = original,
            _n: str = node.name,
        ) -> Any:
            sent.append((_n, packed))
            return _o(packed, deadline, prefix)

        conn.send = spy  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        for conn, original in originals.items():
            conn.send = original


def command_name(packed: bytes) -> bytes:
    # *N\r\n$len\r\nNAME\r\n...
    return packed.split(b"\r\n")[2].upper()


class Profile(BaseModel):
    name: str
    roles: list[str]


# -- the basic suite: cluster and plain server ---------------------------------------------


async def test_create_validate_get_roundtrip(engine_any: SessionEngine) -> None:
    eng = engine_any
    new = await eng.create(user_id="u1", data={"role": "admin"})
    s = new.session
    assert s.user_id == "u1" and s.state is SessionState.ACTIVE and s.data == {"role": "admin"}
    assert s.version == 1 and s.created_at <= s.expires_at <= s.absolute_expires_at
    assert s.session_id not in new.token and len(s.session_id) == 22
    got = await eng.validate(new.token)
    assert got is not None and got.session_id == s.session_id and got.data == s.data
    read = await eng.get(new.token)
    assert read is not None and read.session_id == s.session_id
    assert isinstance(got, Session)


async def test_anonymous_update_rotate_revoke(engine_any: SessionEngine) -> None:
    eng = engine_any
    anon = await eng.create(data={"cart": [1, 2]})
    assert anon.session.user_id is None
    upd = await eng.update(anon.token, data={"cart": [1, 2, 3]})
    assert upd.version == 2 and upd.data == {"cart": [1, 2, 3]}
    rotated = await eng.rotate(anon.token)
    assert await eng.validate(anon.token) is None
    again = await eng.validate(rotated.token)
    assert again is not None and again.data == {"cart": [1, 2, 3]}
    assert rotated.session.session_id != anon.session.session_id
    assert await eng.revoke(rotated.token) is True
    assert await eng.revoke(rotated.token) is False
    assert await eng.validate(rotated.token) is None


async def test_login_binds_anonymous_session_to_user(engine_any: SessionEngine) -> None:
    eng = engine_any
    anon = await eng.create(data={"cart": [7]})
    logged_in = await eng.rotate(anon.token, user_id="alice")
    assert logged_in.session.user_id == "alice" and logged_in.session.data == {"cart": [7]}
    assert await eng.validate(anon.token) is None
    assert [s.session_id for s in await eng.list_user_sessions("alice")] == [
        logged_in.session.session_id
    ]


async def test_user_sessions_list_and_revoke_user(engine_any: SessionEngine) -> None:
    eng = engine_any
    tokens = [(await eng.create(user_id="bob", data={"i": i})).token for i in range(5)]
    listed = await eng.list_user_sessions("bob")
    assert sorted(s.data["i"] for s in listed) == list(range(5))
    assert await eng.revoke_session_id("bob", listed[0].session_id) is True
    assert await eng.revoke_session_id("someone-else", listed[1].session_id) is False
    assert len(await eng.list_user_sessions("bob")) == 4
    assert await eng.revoke_user("bob", except_token=tokens[4]) == 3
    assert [await eng.validate(t) is not None for t in tokens] == [False] * 4 + [True]
    assert await eng.revoke_user("bob") == 1
    assert await eng.list_user_sessions("bob") == []


async def test_chat_basic(engine_any: SessionEngine) -> None:
    eng = engine_any
    for i in range(3):
        assert await eng.chat_append("u1", "room-1", {"role": "user", "text": f"m{i}"}) == i + 1
    msgs = await eng.chat_history("u1", "room-1", limit=2)
    assert [m["text"] for m in msgs] == ["m1", "m2"]
    await eng.chat_clear("u1", "room-1")
    assert await eng.chat_history("u1", "room-1") == []


async def test_validate_many_keeps_order(engine_any: SessionEngine) -> None:
    eng = engine_any
    live = [(await eng.create(user_id=f"u{i}")).token for i in range(50)]
    dead = (await eng.create()).token
    await eng.revoke(dead)
    tokens = [live[0], "garbage", dead, *live[1:], live[0]]
    result = await eng.validate_many(tokens)
    assert len(result) == len(tokens)
    assert result[1] is None and result[2] is None
    ok = [r for r in result if r is not None]
    assert len(ok) == 51
    assert result[0] is not None and result[-1] is not None
    assert result[0].session_id == result[-1].session_id


async def test_stats_counts(engine_any: SessionEngine) -> None:
    eng = engine_any
    new = await eng.create(user_id="s1")
    await eng.validate(new.token)
    await eng.validate("bad")
    await eng.validate(new.token, states={SessionState.LOCKED})
    st = await eng.stats()
    assert st.validations == 3 and st.hits == 1
    assert st.misses.malformed == 1 and st.misses.state == 1
    assert st.active_sessions >= 1
    assert st.latency_p50_ms is not None and st.latency_p99_ms is not None
    assert all(v > 0 for v in st.used_memory_bytes.values())
    assert st.mode in ("cluster", "standalone")


# -- semantics on the cluster ----------------------------------------------------------------


async def test_one_script_call_on_one_node_per_operation(engine: SessionEngine) -> None:
    eng = engine
    new = await eng.create(user_id="one-rt")
    await eng.chat_append("one-rt", "r", {"t": 1})
    await eng.validate(new.token)  # connections to every node involved are open now

    async def check(op: Any) -> Any:
        with sent_commands(eng) as sent:
            result = await op
        assert len(sent) == 1, sent
        assert command_name(sent[0][1]) == b"EVALSHA"
        return result

    await check(eng.validate(new.token))
    await check(eng.get(new.token))
    await check(eng.update(new.token, data={"x": 1}))
    rotated = await check(eng.rotate(new.token))
    await check(eng.list_user_sessions("one-rt"))
    await check(eng.chat_append("one-rt", "r", {"t": 2}))
    await check(eng.revoke(rotated.token))
    await check(eng.revoke_user("one-rt"))
    with sent_commands(eng) as sent:
        await eng.create(user_id="one-rt")
    assert [command_name(p) for _, p in sent] == [b"EVALSHA"]


async def test_bad_input_never_reaches_redis(engine: SessionEngine) -> None:
    eng = engine
    bad_tokens = [
        "",
        "x",
        "{abc}.def",
        "abcdefgh:" + "A" * 43,
        "abcdefgh." + "A" * 41 + "\r\n",
        "abcdefgh." + "A" * 42 + "\x00",
        "abcdefgh." + "é" * 43,
        "a" * 1_000_000,
    ]
    with sent_commands(eng) as sent:
        for tok in bad_tokens:
            start = time.perf_counter()
            assert await eng.validate(tok) is None
            assert await eng.get(tok) is None
            assert await eng.revoke(tok) is False
            assert time.perf_counter() - start < 0.01
        assert await eng.validate_many(bad_tokens) == [None] * len(bad_tokens)
        with pytest.raises(SessionNotFound):
            await eng.update("nope", data={})
        with pytest.raises(SessionNotFound):
            await eng.rotate("nope")
        for bad_id in ["", "x" * 257, "é" * 129]:
            with pytest.raises(InvalidArgument):
                await eng.create(user_id=bad_id)
            with pytest.raises(InvalidArgument):
                await eng.chat_append(bad_id, "room", {"t": 1})
            with pytest.raises(InvalidArgument):
                await eng.chat_append("u", bad_id, {"t": 1})
            with pytest.raises(InvalidArgument):
                await eng.revoke_user(bad_id)
        with pytest.raises(PayloadTooLarge):
            await eng.create(user_id="u", data={"blob": "x" * 20_000})
        with pytest.raises(PayloadTooLarge):
            await eng.chat_append("u", "room", {"blob": "x" * 5000})
        with pytest.raises(InvalidArgument):
            await eng.create(user_id="u", data={"bad": object()})
        with pytest.raises(InvalidArgument):
            await eng.create(user_id="u", idle_ttl=-1)
        with pytest.raises(InvalidArgument):
            await eng.create(user_id="u", state="active")  # type: ignore[arg-type]
    assert sent == []
    assert all_keys(eng.settings.url, eng.settings.key_prefix) == []


async def test_ids_of_any_characters_are_stored_safely(engine: SessionEngine) -> None:
    eng = engine
    nasty = ["a:b", "{tag}", "}{", "x}:s:y", "%41", "sp ace", "nl\r\nx", "nul\x00", "ü→😀"]
    for uid in nasty:
        new = await eng.create(user_id=uid, data={"uid": uid})
        got = await eng.validate(new.token)
        assert got is not None and got.user_id == uid
        assert await eng.chat_append(uid, uid, {"t": uid}) == 1
    # Different (user, room) pairs never share a key, and every key of a user shares a slot.
    assert (await eng.chat_history("a:b", "a:b"))[0]["t"] == "a:b"
    keys = all_keys(eng.settings.url, eng.settings.key_prefix)
    by_tag: dict[bytes, set[int]] = {}
    for key in keys:
        tag = key.split(b"{", 1)[1].split(b"}", 1)[0]
        by_tag.setdefault(tag, set()).add(key_slot(key))
        assert key.count(b"{") == 1 and key.count(b"}") == 1, key
    assert all(len(slots) == 1 for slots in by_tag.values())
    assert len(by_tag) == len(nasty)
    for uid in nasty:
        assert [s.user_id for s in await eng.list_user_sessions(uid)] == [uid]
        assert await eng.revoke_user(uid) == 1


async def test_redis_never_holds_a_secret(engine: SessionEngine) -> None:
    eng = engine
    tokens = [(await eng.create(user_id=f"u{i % 7}", data={"i": i})).token for i in range(60)]
    tokens += [(await eng.create()).token for _ in range(20)]
    for t in tokens[:10]:
        await eng.rotate(t)
    secrets_ = [parse_token(t)[1].encode() for t in tokens]  # type: ignore[index]
    everything = b"\n".join(all_values(eng.settings.url, eng.settings.key_prefix))
    assert everything
    for secret in secrets_:
        assert secret not in everything
        assert secret[:16] not in everything


async def test_anonymous_sessions_spread_over_every_primary(engine: SessionEngine) -> None:
    eng = engine
    for _ in range(10):
        await asyncio.gather(*(eng.create() for _ in range(1000)))
    clients = testing.primary_clients(eng.settings.url)
    assert len(clients) == 3
    counts = []
    for client in clients:
        with client:
            counts.append(
                sum(1 for _ in client.scan_iter(match=f"{eng.settings.key_prefix}:*", count=2000))
            )
    assert sum(counts) == 10_000
    assert min(counts) > 0 and max(counts) <= 0.4 * 10_000, counts


async def test_a_users_keys_share_one_slot(engine: SessionEngine) -> None:
    eng = engine
    for _ in range(5):
        await eng.create(user_id="slotty")
    await eng.chat_append("slotty", "r1", {"t": 1})
    await eng.chat_append("slotty", "r2", {"t": 1})
    keys = all_keys(eng.settings.url, eng.settings.key_prefix)
    assert len(keys) == 5 + 1 + 1 + 2  # sessions, index, room set, two chats
    assert len({key_slot(k) for k in keys}) == 1


async def test_sliding_and_absolute_expiry(make_engine: Any) -> None:
    async with make_engine(idle_ttl=2.0, absolute_ttl=3.0) as eng:
        new = await eng.create(user_id="slide")
        deadline = time.monotonic() + 3.0
        # Validated every 0.5 s it stays valid ... until its absolute deadline, no later.
        while time.monotonic() < deadline - 0.3:
            assert await eng.validate(new.token) is not None
            await asyncio.sleep(0.5)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.3)
        assert await eng.validate(new.token) is None

        other = await eng.create(user_id="slide")
        t = time.monotonic()
        assert await eng.validate(other.token) is not None
        await asyncio.sleep(max(0.0, t + 0.9 * 2.0 - time.monotonic() - 0.05))
        assert await eng.get(other.token) is not None  # still valid at t + 0.9 x idle
        await asyncio.sleep(max(0.0, t + 2.0 + 1.0 - time.monotonic()))
        assert await eng.get(other.token) is None  # gone by last validate + idle + 1 s


async def test_refresh_is_lazy(make_engine: Any) -> None:
    async with make_engine(idle_ttl=10.0, refresh_slack=0.05) as eng:
        new = await eng.create(user_id="lazy")
        key = eng.keys.session(parse_token(new.token)[0], new.session.session_id)  # type: ignore[index]
        url = eng.settings.url
        node = redis.RedisCluster.from_url(url)
        try:
            await asyncio.sleep(0.2)
            before = node.pttl(key)
            await eng.validate(new.token)
            after = node.pttl(key)
            assert after <= before  # nothing written: TTL still counting down
            await asyncio.sleep(0.35)  # now 550 ms below idle: more than the 500 ms slack
            await eng.validate(new.token)
            assert node.pttl(key) > 9_800  # refreshed
        finally:
            node.close()


async def test_compare_and_set(engine: SessionEngine) -> None:
    eng = engine
    new = await eng.create(user_id="cas", data={"n": 0})
    s2 = await eng.update(new.token, data={"n": 1}, expected_version=1)
    assert s2.version == 2
    with pytest.raises(SessionConflict) as err:
        await eng.update(new.token, data={"n": 2}, expected_version=1)
    assert err.value.current_version == 2
    s3 = await eng.update(new.token, state=SessionState.PENDING, expected_version=2)
    assert s3.state is SessionState.PENDING and s3.data == {"n": 1}
    assert await eng.validate(new.token) is None  # PENDING not allowed by default
    allowed = {SessionState.ACTIVE, SessionState.PENDING}
    assert await eng.validate(new.token, states=allowed) is not None
    await eng.revoke(new.token)
    with pytest.raises(SessionNotFound):
        await eng.update(new.token, data={"n": 3})


async def test_pydantic_model_as_data(engine: SessionEngine) -> None:
    new = await engine.create(user_id="pm", data=Profile(name="Ann", roles=["a"]))
    got = await engine.validate(new.token)
    assert got is not None and Profile.model_validate(got.data) == Profile(name="Ann", roles=["a"])


async def test_session_limit_evicts_or_refuses(make_engine: Any) -> None:
    async with make_engine(max_sessions_per_user=3) as eng:
        tokens = [(await eng.create(user_id="lim")).token for _ in range(5)]
        valid = [await eng.validate(t) is not None for t in tokens]
        assert valid == [False, False, True, True, True]
    async with make_engine(max_sessions_per_user=2, session_limit_policy="refuse") as eng:
        await eng.create(user_id="lim2")
        await eng.create(user_id="lim2")
        with pytest.raises(SessionLimitExceeded):
            await eng.create(user_id="lim2")


async def test_chat_is_capped_expires_and_follows_revoke_user(make_engine: Any) -> None:
    async with make_engine(chat_max_messages=5, chat_ttl=1.0) as eng:
        for i in range(12):
            await eng.chat_append("c", "r", {"i": i})
        assert [m["i"] for m in await eng.chat_history("c", "r", limit=100)] == list(range(7, 12))
        await asyncio.sleep(1.3)
        assert await eng.chat_history("c", "r") == []
    async with make_engine(chat_owned_by_sessions=True) as eng:
        with pytest.raises(SessionNotFound):
            await eng.chat_append("owner", "r", {"t": 0})  # no live session
        await eng.create(user_id="owner")
        await eng.chat_append("owner", "r1", {"t": 1})
        await eng.chat_append("owner", "r2", {"t": 1})
        await eng.revoke_user("owner")
        assert await eng.chat_history("owner", "r1") == []
        assert all_keys(eng.settings.url, eng.settings.key_prefix) == []
        with pytest.raises(SessionNotFound):
            await eng.chat_append("owner", "r1", {"t": 2})  # cannot recreate chat keys
    async with make_engine() as eng:  # default: chats outlive revoke_user
        await eng.create(user_id="keep")
        await eng.chat_append("keep", "r", {"t": 1})
        await eng.revoke_user("keep")
        assert len(await eng.chat_history("keep", "r")) == 1


async def test_no_resurrection_under_concurrency(engine: SessionEngine) -> None:
    eng = engine
    tokens = [(await eng.create(user_id="victim", data={"n": 0})).token for _ in range(20)]
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def worker(i: int) -> None:
        tok = tokens[i % len(tokens)]
        while not stop.is_set():
            try:
                if i % 3 == 0:
                    await eng.update(tok, data={"n": i})
                else:
                    await eng.validate(tok)
            except SessionNotFound:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(worker(i)) for i in range(1000)]
    await asyncio.sleep(0.3)
    revoked = await eng.revoke_user("victim")
    await asyncio.sleep(0.3)  # the storm goes on against the revoked sessions
    stop.set()
    await asyncio.gather(*tasks)
    assert not errors
    assert revoked == 20
    assert await eng.validate_many(tokens) == [None] * 20
    for tok in tokens:
        assert await eng.get(tok) is None
    keys = all_keys(eng.settings.url, eng.settings.key_prefix)
    assert not [k for k in keys if b":s:" in k], keys


async def test_revoke_then_late_writers_never_recreate(engine: SessionEngine) -> None:
    eng = engine
    new = await eng.create(user_id="late")
    await eng.revoke(new.token)
    assert await eng.validate(new.token) is None
    with pytest.raises(SessionNotFound):
        await eng.update(new.token, data={"x": 1})
    with pytest.raises(SessionNotFound):
        await eng.rotate(new.token)
    assert await eng.get(new.token) is None
    keys = all_keys(eng.settings.url, eng.settings.key_prefix)
    assert not [k for k in keys if b":s:" in k]


async def test_active_sessions_estimate_within_two_percent(make_engine: Any) -> None:
    async with make_engine(stats_samples=2048) as eng:
        total = 100_000
        for start in range(0, total, 5000):
            await asyncio.gather(
                *(eng.create(user_id=f"est{i % 10_000}") for i in range(start, start + 5000))
            )
        st = await eng.stats()
        assert abs(st.active_sessions - total) <= 0.02 * total, st.active_sessions


async def test_fail_closed_when_redis_does_not_answer(prefix: str) -> None:
    with LocalCluster(cluster_mode=False) as server:
        settings = EngineSettings(url=server.url, key_prefix=prefix, command_timeout=0.3)
        async with SessionEngine(settings) as eng:
            new = await eng.create(user_id="fc")
            server.pause(server.ports[0])
            try:
                start = time.monotonic()
                with pytest.raises(EngineUnavailable):
                    await eng.validate(new.token)
                assert time.monotonic() - start < 0.3 + 0.2
                with pytest.raises(EngineUnavailable):
                    await eng.validate_many([new.token])
                st = await asyncio.wait_for(_stats_or_error(eng), 2)
                assert st is not None
            finally:
                server.resume(server.ports[0])


async def _stats_or_error(eng: SessionEngine) -> object:
    try:
        return await eng.stats()
    except EngineUnavailable as exc:
        return exc


def test_build_session_equals_a_validated_session() -> None:
    from datetime import UTC, datetime

    values = {
        "session_id": "x" * 22,
        "user_id": "u",
        "state": SessionState.ACTIVE,
        "data": {"a": [1]},
        "created_at": datetime.now(UTC),
        "expires_at": datetime.now(UTC),
        "absolute_expires_at": datetime.now(UTC),
        "version": 3,
    }
    fast = build_session(dict(values))
    assert fast == Session(**values)
    assert fast.model_dump() == Session(**values).model_dump()
    with pytest.raises(Exception):  # noqa: B017 - frozen
        fast.version = 4  # type: ignore[misc]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_URL", "redis://127.0.0.1:7777")
    monkeypatch.setenv("ENGINE_IDLE_TTL", "60.5")
    monkeypatch.setenv("ENGINE_PASSWORD", "hunter2")
    s = EngineSettings()
    assert s.url == "redis://127.0.0.1:7777" and s.idle_ttl == 60.5
    assert "hunter2" not in repr(s)
    with pytest.raises(Exception):  # noqa: B017 - frozen
        s.idle_ttl = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        EngineSettings(idle_ttl=100, absolute_ttl=10)


async def test_engine_lifecycle(cluster_url: str, prefix: str) -> None:
    from engine import EngineError
    from engine._tokens import new_token, random_tag

    eng = SessionEngine.from_url(cluster_url, key_prefix=prefix)
    with pytest.raises(EngineError, match="not open"):
        await eng.validate(new_token(random_tag()))
    async with eng:
        assert eng.is_cluster
    await eng.aclose()  # twice is fine
    with pytest.raises(EngineError):
        await eng.open()  # a closed engine stays closed


def test_memo_forgets_its_older_half_when_full() -> None:
    from engine._engine import _memo_put

    memo: dict[int, int] = {}
    for i in range(10):
        _memo_put(memo, i, i, 4)
    assert len(memo) <= 4
    assert 9 in memo and 8 in memo  # the most recent survive
    assert 0 not in memo


async def test_a_shorter_idle_ttl_than_the_default_is_refreshed_in_time(
    make_engine: Any,
) -> None:
    """The refresh slack is a fraction of the session's own idle TTL, not of the default's."""
    async with make_engine() as eng:
        short = await eng.create(user_id="short", idle_ttl=1.5)
        for _ in range(4):
            await asyncio.sleep(0.6)
            assert await eng.validate(short.token) is not None


async def test_absurd_arguments_get_typed_errors_or_none(make_engine: Any) -> None:
    """Unhashable tokens, infinite or NaN TTLs, a bool for a version: never a crash."""
    async with make_engine() as eng:
        live = await eng.create(user_id="absurd")
        assert await eng.validate([]) is None
        assert await eng.validate({}) is None
        with pytest.raises(InvalidArgument):
            await eng.create(user_id="x", idle_ttl=float("inf"))
        with pytest.raises(InvalidArgument):
            await eng.create(user_id="x", absolute_ttl=float("nan"))
        with pytest.raises(InvalidArgument):
            await eng.update(live.token, data={}, expected_version=True)


def test_settings_refuse_a_ttl_past_ten_years() -> None:
    with pytest.raises(ValueError):
        EngineSettings(absolute_ttl=1e10)


async def test_replication_incomplete_keeps_the_result(cluster_url: str, prefix: str) -> None:
    """wait_replicas=2 on a cluster with one replica per primary never gets 2 acks: the
    write happened, and the exception carries what the call would have returned."""
    from helpers import open_engine

    from engine import NewSession, ReplicationIncomplete

    async with open_engine(cluster_url, prefix, wait_replicas=2, wait_timeout=0.1) as eng:
        with pytest.raises(ReplicationIncomplete) as err:
            await eng.create(user_id="durable")
        new = err.value.result
        assert isinstance(new, NewSession) and err.value.acknowledged == 1
        assert await eng.validate(new.token) is not None  # the token is not lost
        with pytest.raises(ReplicationIncomplete) as err2:
            await eng.revoke(new.token)
        assert err2.value.result is True
        assert await eng.validate(new.token) is None
        with pytest.raises(SessionNotFound):
            await eng.rotate(new.token)  # nothing written: the natural error, not WAIT's
