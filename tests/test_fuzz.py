"""Property tests of every public entry that takes outside input (issue 9).

The generators and invariant checks are ``engine.cli.fuzz``'s, the same the atheris targets of
``python -m engine fuzz`` use; here Hypothesis draws the choices (derandomized, so CI runs
the same examples every time). Each check raises ``InvariantBroken`` with the input when
an entry answers with anything but a clear engine error or a correct result, writes after
a refusal, or shows a secret in an error. The examples at the end pin the contract the
fuzzers found or the issue asked for, one case each.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from helpers import all_keys, delete_prefix, open_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from engine import (
    EngineError,
    EngineSettings,
    InvalidArgument,
    PayloadTooLarge,
    SessionEngine,
)
from engine._settings import redact_url
from engine._transport import Transport, TransportOptions
from engine.cli.fuzz import (
    MAX_ID_BYTES,
    MAX_PAYLOAD,
    TAG_SECRET,
    HttpApp,
    JailLoop,
    RedisContext,
    check_chat,
    check_create_args,
    check_http,
    check_ids,
    check_settings,
    check_token,
    check_url,
    engine_fields,
)

BOUNDED = settings(
    derandomize=True,
    database=None,
    deadline=None,
    report_multiple_bugs=False,  # shrink one failure, not each: a failing run stays short
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one engine for all examples, emptied after each
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


class DrawSource:
    """``engine.cli.fuzz.Source`` over a Hypothesis ``data()`` draw."""

    def __init__(self, data: st.DataObject) -> None:
        self._draw = data.draw

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(st.integers(lo, hi))

    def any_int(self) -> int:
        return self._draw(st.integers() | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]))

    def floating(self) -> float:
        return self._draw(st.floats())

    def text(self, max_len: int) -> str:
        return self._draw(st.text(st.characters(exclude_categories=()), max_size=max_len))

    def raw(self, max_len: int) -> bytes:
        return self._draw(st.binary(max_size=max_len))


# -- no Redis ----------------------------------------------------------------------------

idle_engine = SessionEngine(EngineSettings(**engine_fields()))


@settings(BOUNDED, max_examples=300)
@given(st.data())
async def test_token_entries_with_any_object(data: st.DataObject) -> None:
    await check_token(idle_engine, DrawSource(data), live=False)


@settings(BOUNDED, max_examples=400)
@given(st.data())
async def test_create_and_update_arguments(data: st.DataObject) -> None:
    await check_create_args(idle_engine, DrawSource(data))


@settings(BOUNDED, max_examples=150)
@given(st.data())
def test_settings_from_kwargs_and_environment(data: st.DataObject) -> None:
    check_settings(DrawSource(data))


@pytest.fixture(scope="module")
def jail() -> Iterator[JailLoop]:
    """An event loop that refuses every connection (and records where it was asked to)."""
    loop = JailLoop()
    yield loop
    loop.close()


@settings(BOUNDED, max_examples=200)
@given(st.data())
def test_urls_with_passwords(jail: JailLoop, data: st.DataObject) -> None:
    jail.run_until_complete(check_url(DrawSource(data), jail))


@pytest.fixture(scope="module")
async def http_app() -> AsyncIterator[HttpApp]:
    app = HttpApp()
    await app.start()
    yield app
    await app.stop()


@settings(BOUNDED, max_examples=300)
@given(st.data())
async def test_fastapi_dependencies_with_any_header_bytes(
    http_app: HttpApp, data: st.DataObject
) -> None:
    await check_http(http_app, DrawSource(data))


# -- on the cluster ----------------------------------------------------------------------


@pytest.fixture
async def ctx(cluster_url: str, prefix: str) -> AsyncIterator[RedisContext]:
    prefixes = [prefix, f"{prefix}o"]

    async def keys() -> list[bytes]:
        found: list[bytes] = []
        for p in prefixes:
            found += await asyncio.to_thread(all_keys, cluster_url, p)
        return found

    async def clear() -> None:
        for p in prefixes:
            await asyncio.to_thread(delete_prefix, cluster_url, p)

    fields = engine_fields()
    async with (
        open_engine(cluster_url, prefix, **fields) as eng,
        open_engine(cluster_url, f"{prefix}o", chat_owned_by_sessions=True, **fields) as owned,
    ):
        yield RedisContext(engine=eng, owned=owned, keys=keys, clear=clear)


@pytest.mark.cluster
@settings(BOUNDED, max_examples=60)
@given(st.data())
async def test_token_entries_on_the_cluster(ctx: RedisContext, data: st.DataObject) -> None:
    await check_token(ctx.engine, DrawSource(data), live=True, keys=ctx.keys, clear=ctx.clear)


@pytest.mark.cluster
@settings(BOUNDED, max_examples=120)
@given(st.data())
async def test_ids_on_the_cluster(ctx: RedisContext, data: st.DataObject) -> None:
    await check_ids(ctx, DrawSource(data))


@pytest.mark.cluster
@settings(BOUNDED, max_examples=100)
@given(st.data())
async def test_chat_messages_on_the_cluster(ctx: RedisContext, data: st.DataObject) -> None:
    await check_chat(ctx, DrawSource(data))


# -- the contract, one case each -----------------------------------------------------------


class _Constants(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    score: float


REFUSED_DATA: list[Any] = [
    RootModel[list[int]]([1, 2]),
    RootModel[str]("text"),
    _Constants(score=math.nan),
    _Constants(score=math.inf),
    {"a": math.nan},
    {"a": math.inf},
    {"a": [1, {"b": -math.inf}]},
    {1: "x"},
    {None: "x"},
    {("t",): "x"},
    {"a": "\ud800"},
    {"a": b"bytes"},
    [1, 2],
    "text",
]


@pytest.mark.cluster
@pytest.mark.parametrize("data", REFUSED_DATA, ids=lambda v: repr(v)[:40])
async def test_data_that_is_not_a_json_object_is_refused_before_any_write(
    ctx: RedisContext, data: Any
) -> None:
    with pytest.raises(InvalidArgument):
        await ctx.engine.create(user_id="u1", data=data)
    assert await ctx.keys() == []
    with pytest.raises(InvalidArgument):
        await ctx.engine.chat_append("u1", "r1", data)
    assert await ctx.keys() == []


@pytest.mark.cluster
async def test_payload_limit_is_exact(ctx: RedisContext) -> None:
    fits = {"k": "x" * (MAX_PAYLOAD - 8)}  # {"k":"..."} is len + 8 bytes
    new = await ctx.engine.create(user_id="u1", data=fits)
    assert new.session.data == fits
    await ctx.clear()
    with pytest.raises(PayloadTooLarge):
        await ctx.engine.create(user_id="u1", data={"k": "x" * (MAX_PAYLOAD - 7)})
    assert await ctx.keys() == []


@pytest.mark.cluster
@pytest.mark.parametrize(
    "user_id",
    ["", "\ud800", "a\udcff", "a" * (MAX_ID_BYTES + 1), "é" * (MAX_ID_BYTES // 2 + 1), 1, None],
    ids=lambda v: repr(v)[:40],
)
async def test_bad_ids_are_refused_before_any_write(ctx: RedisContext, user_id: Any) -> None:
    if user_id is not None:  # None is an anonymous session for create
        with pytest.raises(InvalidArgument):
            await ctx.engine.create(user_id=user_id)
    for args in ((user_id, "r1"), ("u1", user_id)):
        with pytest.raises(InvalidArgument):
            await ctx.engine.chat_append(*args, {"m": 1})
    assert await ctx.keys() == []


@pytest.mark.cluster
@pytest.mark.parametrize(
    "user_id", ["é" * (MAX_ID_BYTES // 2), "a:{b}%|\r\n\x00 "], ids=lambda v: repr(v)[:40]
)
async def test_ids_at_the_limit_and_with_key_syntax_round_trip(
    ctx: RedisContext, user_id: str
) -> None:
    new = await ctx.engine.create(user_id=user_id)
    assert new.session.user_id == user_id
    assert [s.session_id for s in await ctx.engine.list_user_sessions(user_id)] == [
        new.session.session_id
    ]
    assert await ctx.engine.chat_append(user_id, user_id, {"m": 1}) == 1
    assert await ctx.engine.chat_history(user_id, user_id) == [{"m": 1}]


@pytest.mark.parametrize(
    "ttls",
    [
        {"idle_ttl": 0.5},
        {"absolute_ttl": 0.999},
        {"idle_ttl": 100, "absolute_ttl": 50},
        {"idle_ttl": 10**400},
        {"idle_ttl": math.nan},
        {"absolute_ttl": True},
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_ttl_arguments_are_refused(ttls: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        await idle_engine.create(user_id="u1", **ttls)


@pytest.mark.parametrize(
    "fields",
    [{"idle_ttl": 0.5}, {"idle_ttl": 100, "absolute_ttl": 50}, {"chat_ttl": 0.5}],
    ids=lambda v: repr(v)[:40],
)
def test_ttl_settings_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EngineSettings(**fields)


def test_settings_errors_show_no_secret() -> None:
    password, url_password = "pw-hunter2-0123456789", "url-hunter2-0123456789"
    with pytest.raises(ValidationError) as info:
        EngineSettings(
            url=f"redis://admin:{url_password}@127.0.0.1:7000",
            password=password,
            tag_secret=TAG_SECRET,
            idle_ttl=100,
            absolute_ttl=50,
        )
    for text in (str(info.value), repr(info.value)):
        for secret in (password, url_password, TAG_SECRET):
            assert secret not in text


@pytest.mark.parametrize(
    "fields",
    [{"latency_window": 10**12}, {"wait_replicas": 1, "wait_timeout": math.inf}],
    ids=lambda v: repr(v)[:40],
)
def test_settings_cannot_break_the_engine_constructor(fields: dict[str, Any]) -> None:
    """Accepted settings build an engine (no MemoryError, no OverflowError)."""
    try:
        accepted = EngineSettings(**fields)
    except ValidationError:
        return
    with contextlib.suppress(EngineError):
        SessionEngine(accepted)


def test_fuzz_command_runs_a_pure_target() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine", "fuzz", "token", "--runs", "300"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fuzz token: ok" in out.stderr


@pytest.mark.parametrize(
    "url", ["127.0.0.1:7000", ":hunter2hunter2@127.0.0.1:7000", "redis:/127.0.0.1:7000"]
)
def test_url_without_a_host_never_reaches_another_server(jail: JailLoop, url: str) -> None:
    """A typo in ENGINE_URL is refused (by the settings, before anything connects); it
    must not silently mean 127.0.0.1:6379."""
    jail.attempts.clear()
    with pytest.raises(ValidationError) as info:
        EngineSettings(url=url)
    assert "hunter2" not in str(info.value)
    with pytest.raises(InvalidArgument):  # the transport refuses it too, given directly
        Transport(TransportOptions(url=url))
    assert jail.attempts == []


@pytest.mark.parametrize(
    "url", ["redis://:hunter2hunter2@[::1:7000", "redis://:hunter2hunter2[@[::1]:7000"]
)
def test_malformed_url_is_a_clear_error(jail: JailLoop, url: str) -> None:
    with pytest.raises(ValidationError) as info:
        EngineSettings(url=url)
    assert "hunter2hunter2" not in str(info.value)
    with pytest.raises(InvalidArgument) as refused:
        Transport(TransportOptions(url=url))
    assert "hunter2hunter2" not in str(refused.value)


def test_settings_repr_hides_an_unencoded_password() -> None:
    """'#' in a password the user forgot to percent-encode ends the URL's netloc for a URL
    parser; the redaction must not rely on one, and the refusal must not echo it."""
    url = "redis://admin:hunter2#hunter2@127.0.0.1:7000"
    assert "hunter2" not in redact_url(url)
    with pytest.raises(ValidationError) as info:
        EngineSettings(url=url)
    assert "hunter2" not in str(info.value)
    for odd in ("redis://u:a/b?c#d@h:1", "redis://:p@ss@h:1"):
        assert "p@ss" not in redact_url(odd) and "a/b?c#d" not in redact_url(odd)
