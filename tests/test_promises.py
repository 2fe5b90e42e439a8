"""The README's promises under lost replies, hostile input and tight settings.

Lost replies are made for real: a TCP proxy (tests/lossy_proxy.py) between the engine and
a plain redis-server lets the server run a command and cuts the connection before the
reply, with another client's write slipped in between when the test needs one.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import urlparse

import pytest
from helpers import all_keys, delete_prefix, open_engine
from lossy_proxy import LossyProxy
from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from engine import (
    ChatRoomLimitExceeded,
    EngineSettings,
    EngineUnavailable,
    InvalidArgument,
    OutcomeUnknown,
    SessionEngine,
    SessionState,
)
from engine._keys import slot_of_tag
from engine._transport import TransportOptions, pack


def _port(url: str) -> int:
    port = urlparse(url).port
    assert port is not None
    return port


@pytest.fixture
async def lossy(standalone_url: str) -> Any:
    async with LossyProxy(_port(standalone_url)) as proxy:
        yield proxy


@pytest.fixture
async def pair(standalone_url: str, lossy: LossyProxy, prefix: str) -> Any:
    """(engine through the lossy proxy, engine straight to the server), same prefix."""
    async with (
        open_engine(lossy.url, prefix) as through,
        open_engine(standalone_url, prefix) as direct,
    ):
        yield through, direct


# -- no resurrection through retries ------------------------------------------------------


async def test_create_whose_reply_is_lost_is_not_resent_over_a_revoke_user(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    lossy.drop_next_reply(before_close=lambda: direct.revoke_user("alice"))
    with pytest.raises(OutcomeUnknown):
        await eng.create(user_id="alice")
    assert lossy.dropped == 1
    # The revoke_user came after the create ran: nothing of alice's may be live now.
    assert await direct.list_user_sessions("alice") == []


async def test_login_rotate_whose_create_reply_is_lost_is_not_resent(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    anonymous = await eng.create()
    # Reply 1 is the take of the anonymous session; reply 2, the create in bob's slot.
    lossy.drop_next_reply(skip=1, before_close=lambda: direct.revoke_user("bob"))
    with pytest.raises(OutcomeUnknown):
        await eng.rotate(anonymous.token, user_id="bob")
    assert await direct.list_user_sessions("bob") == []
    assert await direct.validate(anonymous.token) is None


async def test_revoke_whose_reply_is_lost_says_so_instead_of_false(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    new = await direct.create(user_id="carol")
    lossy.drop_next_reply()
    with pytest.raises(OutcomeUnknown):
        await eng.revoke(new.token)
    assert await direct.validate(new.token) is None


async def test_revoke_whose_request_is_lost_is_resent_and_true(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    new = await direct.create(user_id="dave")
    lossy.drop_next_request()
    assert await eng.revoke(new.token) is True
    assert lossy.dropped == 1
    assert await direct.validate(new.token) is None


async def test_revoke_user_whose_reply_is_lost_leaves_nothing_and_says_unknown(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    tokens = [(await direct.create(user_id="erin")).token for _ in range(3)]
    lossy.drop_next_reply()
    with pytest.raises(OutcomeUnknown):
        await eng.revoke_user("erin")
    assert [await direct.validate(t) for t in tokens] == [None, None, None]


async def test_update_and_chat_append_with_lost_reply_are_not_resent(
    pair: tuple[SessionEngine, SessionEngine], lossy: LossyProxy
) -> None:
    eng, direct = pair
    new = await direct.create(user_id="frank", data={"n": 0})
    lossy.drop_next_reply()
    with pytest.raises(OutcomeUnknown):
        await eng.update(new.token, data={"n": 1})
    session = await direct.validate(new.token)
    assert session is not None and session.version == 2  # applied once, not twice
    await eng.ping()  # reconnect first: the proxy drops the next reply, whatever it is
    lossy.drop_next_reply()
    with pytest.raises(OutcomeUnknown):
        await eng.chat_append("frank", "room", {"text": "hi"})
    assert await direct.chat_history("frank", "room") == [{"text": "hi"}]


# -- settings and arguments are checked before any write ----------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"idle_ttl": 0.0004},
        {"idle_ttl": 0.5},
        {"absolute_ttl": 0.9, "idle_ttl": 1},
        {"idle_ttl": 100, "absolute_ttl": 10},
        {"chat_ttl": 0.01},
        {"wait_timeout": 0.0001},
        {"command_timeout": 0},
        {"chat_max_rooms_per_user": 0},
    ],
)
def test_settings_refuse_values_that_would_round_to_nothing(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EngineSettings(**fields)


async def test_create_refuses_sub_second_or_inverted_ttls_before_any_write(
    engine: SessionEngine, cluster_url: str, prefix: str
) -> None:
    for kwargs in (
        {"idle_ttl": 0.0004},
        {"idle_ttl": 0.999},
        {"absolute_ttl": 0.5},
        {"idle_ttl": 10, "absolute_ttl": 5},
        {"idle_ttl": math.inf},
        {"idle_ttl": True},
    ):
        with pytest.raises(InvalidArgument):
            await engine.create(user_id="u", **kwargs)
    assert await asyncio.to_thread(all_keys, cluster_url, prefix) == []


async def test_a_create_that_fails_in_redis_evicts_nothing(make_engine: Any) -> None:
    """create.lua checks everything that can fail before its first delete: a create at the
    user's limit with a TTL Redis refuses must leave the live session alone."""
    async with make_engine(max_sessions_per_user=1) as eng:
        live = await eng.create(user_id="gina")
        tag = eng.keys.user_tag("gina")
        script = eng._scripts["create"]
        keys = [eng.keys.session(tag, "x" * 22), eng.keys.user_index(tag, "gina")]
        args = ("x" * 22, "gina", "a", b"{}", 0, 0, 1, "evict", eng.keys.base(tag))
        reply = await eng.transport.call(
            slot_of_tag(tag),
            pack((b"EVALSHA", script.sha, len(keys), *keys, *args)),
            script=script,
        )
        assert "ERR" in str(reply)
        assert await eng.validate(live.token) is not None


class _Items(RootModel[list[int]]):
    pass


class _Reading(BaseModel):
    value: float


class _ReadingAsConstants(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    value: float


@pytest.mark.parametrize(
    "data",
    [
        _Items([1, 2]),
        _Reading(value=math.nan),
        _Reading(value=math.inf),
        _ReadingAsConstants(value=math.nan),
        {"x": math.nan},
        {"x": [1.0, -math.inf]},
        {"x": {"y": math.nan}},
        {1: "non-str key"},
        [1, 2],
        "text",
    ],
    ids=repr,
)
async def test_data_that_is_not_a_json_object_is_refused_before_any_write(
    engine: SessionEngine, cluster_url: str, prefix: str, data: Any
) -> None:
    with pytest.raises(InvalidArgument):
        await engine.create(user_id="hank", data=data)
    with pytest.raises(InvalidArgument):
        await engine.chat_append("hank", "room", data)
    assert await asyncio.to_thread(all_keys, cluster_url, prefix) == []
    live = await engine.create(user_id="hank")
    with pytest.raises(InvalidArgument):
        await engine.update(live.token, data=data)
    session = await engine.validate(live.token)
    assert session is not None and session.version == 1 and session.data == {}


async def test_valid_data_with_nulls_and_floats_still_round_trips(engine: SessionEngine) -> None:
    data = {"a": None, "b": [1.5, None, {"c": -0.0}], "d": "NaN"}
    new = await engine.create(user_id="ivy", data=data)
    session = await engine.validate(new.token)
    assert session is not None and session.data == data


# -- bounded work ---------------------------------------------------------------------------


async def test_chat_rooms_per_user_are_bounded_and_cleared_rooms_free_their_place(
    make_engine: Any,
) -> None:
    async with make_engine(chat_max_rooms_per_user=3) as eng:
        for room in ("r1", "r2", "r3"):
            await eng.chat_append("jack", room, {"m": room})
        with pytest.raises(ChatRoomLimitExceeded):
            await eng.chat_append("jack", "r4", {"m": "r4"})
        assert await eng.chat_history("jack", "r4") == []
        assert await eng.chat_append("jack", "r1", {"m": "again"}) == 2  # old rooms go on
        await eng.chat_clear("jack", "r2")
        assert await eng.chat_append("jack", "r4", {"m": "r4"}) == 1


async def test_validate_many_prepares_one_batch_at_a_time(make_engine: Any) -> None:
    async with make_engine(bulk_batch=10) as eng:
        tokens = [(await eng.create(user_id=f"k{i}")).token for i in range(5)]
        taken = 0

        def stream() -> Any:
            nonlocal taken
            for i in range(95):
                taken += 1
                yield tokens[i % 5] if i % 2 else "not a token"

        seen: list[int] = []
        real = eng.transport.call_many

        async def spy(items: Any, **kw: Any) -> Any:
            seen.append(taken)
            return await real(items, **kw)

        eng.transport.call_many = spy
        results = await eng.validate_many(stream())
        assert seen[:3] == [10, 20, 30]  # one batch taken from the generator per round
        assert len(results) == 95
        assert [r is not None for r in results] == [bool(i % 2) for i in range(95)]


# -- no secret in reprs, errors or logs ---------------------------------------------------


async def test_no_password_in_reprs_or_errors() -> None:
    url = "redis://default:hunter2@127.0.0.1:1"
    settings = EngineSettings(url=url, password="hunter3", connect_timeout=0.2)
    for text in (repr(settings), str(settings)):
        assert "hunter2" not in text and "hunter3" not in text
    options = TransportOptions(url=url, password="hunter3")
    assert "hunter2" not in repr(options) and "hunter3" not in repr(options)
    with pytest.raises(ValidationError) as invalid:
        EngineSettings(url=url, idle_ttl=100, absolute_ttl=10)
    assert "hunter2" not in str(invalid.value)
    with pytest.raises(EngineUnavailable) as down:
        await SessionEngine(settings).open()
    assert "hunter2" not in str(down.value) and "hunter3" not in str(down.value)


async def test_open_cancelled_mid_handshake_leaves_no_socket() -> None:
    """A connect that aclose() (or any cancellation) interrupts closes its socket."""
    accepted: list[asyncio.StreamReader] = []
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)  # accepts and never answers, like a SIGSTOPped server
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        opening = asyncio.create_task(
            SessionEngine(url=f"redis://127.0.0.1:{port}", connect_timeout=5).open()
        )
        await asyncio.wait_for(connected.wait(), 5)
        await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        # Our side closed the socket: the server reads EOF.
        data = await asyncio.wait_for(accepted[0].read(), 2.0)
        assert b"PING" in data  # it got the handshake, then the close
    finally:
        server.close()


async def test_states_argument_still_checked(engine: SessionEngine) -> None:
    new = await engine.create(user_id="liz", state=SessionState.PENDING)
    assert await engine.validate(new.token) is None
    assert await engine.validate(new.token, states={SessionState.PENDING}) is not None


# -- several seeds --------------------------------------------------------------------------


async def test_startup_succeeds_while_any_seed_answers(cluster_url: str, prefix: str) -> None:
    dead = "redis://127.0.0.1:1"  # nothing listens on port 1: refused at once
    settings = EngineSettings(url=f"{dead}, {cluster_url}", key_prefix=prefix)
    try:
        async with SessionEngine(settings) as eng:
            new = await eng.create(user_id="seeds")
            assert await eng.validate(new.token) is not None
    finally:
        await asyncio.to_thread(delete_prefix, cluster_url, prefix)


async def test_no_seed_answering_is_a_clear_error_without_passwords() -> None:
    url = "redis://:hunter2@127.0.0.1:1,redis://:hunter3@127.0.0.1:2"
    with pytest.raises(EngineUnavailable, match="no seed answered") as down:
        await SessionEngine(url=url, connect_timeout=0.2).open()
    assert "hunter2" not in str(down.value) and "hunter3" not in str(down.value)
    shown = repr(EngineSettings(url=url))
    assert "hunter2" not in shown and "hunter3" not in shown
    assert "127.0.0.1:1" in shown and "127.0.0.1:2" in shown
    with pytest.raises(ValidationError):
        EngineSettings(url="redis://127.0.0.1:1,rediss://127.0.0.1:2")
