"""The checks of the targets that call the engine: token, data, ids, chat, settings, url."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from ..._engine import SessionEngine
from ..._errors import SessionNotFound
from ..._models import SessionState
from ..._settings import MAX_TTL, EngineSettings
from ..._tokens import parse_token
from ._core import (
    MAX_ID_BYTES,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    MIN_TTL,
    TAG_SECRET,
    Source,
    all_kinds,
    broken,
    data_verdict,
    expect,
    id_verdict,
    leaked,
    outcome,
    pick,
    reached_io,
    show,
    token_ok,
    ttl_verdict,
    unexpected,
)
from ._gen import (
    SETTING_FIELDS,
    canonical_token,
    gen_data,
    gen_id,
    gen_secrets,
    gen_setting_value,
    gen_token,
    gen_ttl,
    gen_url,
)

# -- target: token ---------------------------------------------------------------------


def check_parser(token: object) -> None:
    """``parse_token`` never raises and accepts exactly the reference's tokens."""
    try:
        got = parse_token(token)
    except Exception as exc:
        raise broken("token", f"parse_token raised {show(exc)}", token=token) from exc
    if token_ok(token) and type(token) is str:
        want = (token[:8], token[9:])
        if got != want:
            raise broken("token", f"parse_token gave {show(got)}, not {want}", token=token)
    elif token_ok(token):  # a str subclass: refusing it is fine too
        if got is not None and got != (token[:8], token[9:]):  # type: ignore[index]
            raise broken("token", f"parse_token gave {show(got)}", token=token)
    elif got is not None:
        raise broken("token", f"parse_token accepted a token it never issued: {got}", token=token)


async def check_token(
    engine: Any,
    src: Source,
    *,
    live: bool,
    keys: Callable[[], Awaitable[list[bytes]]] | None = None,
    clear: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Every entry that takes a token, with anything as the token.

    ``live``: ``engine`` is open (no session has these random tokens, so: None, False,
    SessionNotFound, and no key written; then a near miss of a live session's token does
    not validate). Otherwise the engine is not open: a token that does not parse gets the
    same answers, one that does reaches I/O (the "not open" error).
    """
    token = gen_token(src)
    other = gen_token(src)
    check_parser(token)
    parses = token_ok(token)
    either = isinstance(token, str) and type(token) is not str and parses
    secrets = [token, token[9:] if parses else None] if isinstance(token, str) else []
    tokens: list[object] = [token, other]
    many_arg: Any = pick(src, [tokens, tuple(tokens), iter(tokens)])
    user = "fuzz-user"

    def judge(name: str, result: Any, exc: BaseException | None, want: Any, io: bool) -> None:
        args = {"token": token, "other": other}
        if exc is not None:
            if unexpected(exc):
                raise broken("token", f"{name} raised {show(exc)}", **args) from exc
            if (s := leaked(exc, secrets)) is not None:
                raise broken("token", f"{name}: the token is in the error text", secret=s, **args)
        if not live and exc is not None and reached_io(exc):
            return  # an engine that is not open may say so before looking at the token
        if io and not live and not either:
            raise broken("token", f"{name} answered without I/O: {show(result)}", **args)
        if want is SessionNotFound:
            if not isinstance(exc, SessionNotFound):
                raise broken("token", f"{name} gave {show(result)} / {show(exc)}", **args)
        elif exc is not None or result != want:
            raise broken("token", f"{name} gave {show(result)} / {show(exc)}, not {want}", **args)

    r, e = await outcome(engine.validate(token))
    judge("validate", r, e, None, parses)
    states = pick(src, [None, {SessionState.ACTIVE}, list(SessionState)])
    r, e = await outcome(engine.validate(token, states))
    judge("validate(states)", r, e, None, parses)
    r, e = await outcome(engine.validate_many(many_arg))
    judge("validate_many", r, e, [None, None], parses or token_ok(other))
    r, e = await outcome(engine.get(token))
    judge("get", r, e, None, parses)
    r, e = await outcome(engine.revoke(token))
    judge("revoke", r, e, False, parses)
    r, e = await outcome(engine.update(token, data={"a": 1}))
    judge("update", r, e, SessionNotFound, parses)
    r, e = await outcome(engine.rotate(token))
    judge("rotate", r, e, SessionNotFound, parses)
    r, e = await outcome(engine.revoke_user(user, except_token=token))
    judge("revoke_user(except_token)", r, e, 0, True)
    if keys is not None and (found := await keys()):
        raise broken("token", "a token call wrote keys", token=token, keys=found[:5])
    if live and clear is not None:
        try:
            await _check_near_miss(engine, src)
        finally:
            await clear()


async def _check_near_miss(engine: Any, src: Source) -> None:
    """A token one edit away from a live session's validates to nothing."""
    new = await engine.create(user_id="fuzz-near", data={"n": 1})
    real = new.token
    pos = src.integer(0, len(real) - 1)
    ch = pick(src, ["A", "a", "-", "_", ".", "Q", "g", "w", " ", "é"])
    variant = pick(
        src,
        [
            real[:pos] + ch + real[pos + 1 :],
            real.swapcase(),
            real + pick(src, [" ", "\n", "\x00", "A"]),
            real[:-1],
            real.encode(),
            real.replace(".", "", 1),
        ],
    )
    found = await engine.validate(variant)
    if variant == real and type(variant) is str:
        if found is None or found.session_id != new.session.session_id:
            raise broken("token", "a live token did not validate", token=real)
    elif found is not None:
        raise broken("token", "a near miss of a live token validated", token=real, variant=variant)
    many = await engine.validate_many([variant, real])
    if many[1] is None or (many[0] is not None and variant != real):
        raise broken(
            "token",
            "validate_many mixed up a live token and its near miss",
            token=real,
            variant=variant,
            got=many,
        )


# -- target: data (create/update arguments, no Redis) ------------------------------------


async def check_create_args(engine: Any, src: Source) -> None:
    """``create``/``update`` on an engine that is not open: every argument is checked
    before any I/O, so a refusal is InvalidArgument and an acceptance reaches I/O."""
    data = gen_data(src, MAX_PAYLOAD)
    dv = data_verdict(data, MAX_PAYLOAD)
    secrets = [TAG_SECRET]
    if src.integer(0, 2):
        user_id = gen_id(src) if src.integer(0, 3) else None
        state = pick(src, [SessionState.ACTIVE, SessionState.PENDING, "active", None, 1])
        idle, absolute = gen_ttl(src), gen_ttl(src)
        parts = [
            (True if user_id is None else id_verdict(user_id)),
            isinstance(state, SessionState),
            ttl_verdict(idle),
            ttl_verdict(absolute),
        ]
        if all(parts[2:]) and idle is not None and absolute is not None:
            parts.append(float(absolute) >= float(idle))  # type: ignore[arg-type]
        elif idle is not None or absolute is not None:
            parts.append(None)  # against the other one's default: either
        ok = all_kinds([dv.ok, *parts])
        _, exc = await outcome(
            engine.create(
                user_id=user_id, data=data, state=state, idle_ttl=idle, absolute_ttl=absolute
            )
        )
        expect(
            "data",
            "create",
            ok,
            exc,
            too_large=dv.too_large and all_kinds(parts) is True,
            secrets=secrets,
            user_id=user_id,
            data=data,
            state=state,
            idle_ttl=idle,
            absolute_ttl=absolute,
            verdict=dv,
        )
        if exc is None:
            raise broken("data", "create succeeded on an engine that is not open", data=data)
        return
    token = canonical_token(src)
    state = pick(src, [None, SessionState.LOCKED, "locked", 0])
    version = pick(src, [None, 0, 7, -1, True, 1.0, "1", 2**70])
    parts = [
        state is None or isinstance(state, SessionState),
        version is None or (type(version) is int and version >= 0),
    ]
    ok = all_kinds([dv.ok, *parts])
    _, exc = await outcome(engine.update(token, data=data, state=state, expected_version=version))
    expect(
        "data",
        "update",
        ok,
        exc,
        too_large=dv.too_large and all(parts),
        secrets=[*secrets, token],
        data=data,
        state=state,
        expected_version=version,
        verdict=dv,
    )


# -- targets that need Redis -------------------------------------------------------------


@dataclass
class RedisContext:
    """Open engines on a real cluster and a way to see every key under their prefixes.

    ``engine``: max_id_bytes / payload / message limits as above. ``owned``: the same with
    ``chat_owned_by_sessions``. ``keys()`` lists every key under both prefixes on every
    primary; ``clear()`` deletes them.
    """

    engine: Any
    owned: Any
    keys: Callable[[], Awaitable[list[bytes]]]
    clear: Callable[[], Awaitable[None]]


def engine_fields() -> dict[str, Any]:
    """Settings of the engines the Redis targets use."""
    return {
        "max_id_bytes": MAX_ID_BYTES,
        "max_payload_bytes": MAX_PAYLOAD,
        "chat_max_message_bytes": MAX_MESSAGE,
        "tag_secret": TAG_SECRET,
        "command_timeout": 5.0,
    }


async def _no_write(ctx: RedisContext, target: str, what: str, **inputs: object) -> None:
    found = await ctx.keys()
    if found:
        raise broken(target, f"{what} was refused but wrote keys", keys=found[:5], **inputs)


async def check_ids(ctx: RedisContext, src: Source) -> None:
    """User and room ids through every entry that takes them, against a real cluster."""
    eng = ctx.engine
    user_id, room_id = gen_id(src), gen_id(src)
    if user_id is None:  # an anonymous create: the data target covers it
        user_id = "u-none"
    user_ok, room_ok = id_verdict(user_id), id_verdict(room_id)
    inputs: dict[str, Any] = {"user_id": user_id, "room_id": room_id}
    op = src.integer(0, 5)
    wrote = False
    try:
        if op == 5:
            wrote = await _check_stored_data(ctx, src)
        elif op == 0:  # create, then find it again by token and by owner
            new, exc = await outcome(eng.create(user_id=user_id, data={"n": 1}))
            if not expect("ids", "create", user_ok, exc, secrets=[TAG_SECRET], live=True, **inputs):
                await _no_write(ctx, "ids", "create", **inputs)
                return
            wrote = True
            session = await eng.validate(new.token)
            if new.session.user_id != user_id or session is None or session.user_id != user_id:
                raise broken("ids", "the owner did not round-trip", got=session, **inputs)
            listed = await eng.list_user_sessions(user_id)
            if [s.session_id for s in listed] != [new.session.session_id]:
                raise broken("ids", "list_user_sessions disagrees", listed=listed, **inputs)
            if await eng.revoke_user(user_id) != 1 or await eng.validate(new.token) is not None:
                raise broken("ids", "revoke_user did not revoke", **inputs)
        elif op == 1:  # log an anonymous session in as user_id
            new = await eng.create(data={"n": 2})
            wrote = True
            rotated, exc = await outcome(eng.rotate(new.token, user_id=user_id))
            if not expect("ids", "rotate", user_ok, exc, secrets=[new.token], live=True, **inputs):
                if await eng.validate(new.token) is None:
                    raise broken("ids", "a refused rotate killed the session", **inputs)
                return
            if rotated.session.user_id != user_id or rotated.session.data != {"n": 2}:
                raise broken("ids", "rotate lost the owner or data", got=rotated, **inputs)
            if await eng.validate(new.token) is not None:
                raise broken("ids", "the old token still works after rotate", **inputs)
        elif op in (2, 3):  # chat: append, read back, never share a key with another pair
            n, exc = await outcome(eng.chat_append(user_id, room_id, {"m": "hi"}))
            if not expect("ids", "chat_append", user_ok and room_ok, exc, live=True, **inputs):
                await _no_write(ctx, "ids", "chat_append", **inputs)
                return
            wrote = True
            history = await eng.chat_history(user_id, room_id)
            if n != 1 or history != [{"m": "hi"}]:
                raise broken("ids", "chat did not round-trip", n=n, history=history, **inputs)
            other_user, other_room = gen_id(src), gen_id(src)
            if (
                id_verdict(other_user)
                and id_verdict(other_room)
                and (other_user, other_room) != (user_id, room_id)
            ):
                seen = await eng.chat_history(other_user, other_room)
                if seen:
                    raise broken(
                        "ids",
                        "two (user, room) pairs share a chat history",
                        other_user=other_user,
                        other_room=other_room,
                        **inputs,
                    )
        else:  # the read-only and delete entries refuse exactly what create refuses
            calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("list_user_sessions", lambda: eng.list_user_sessions(user_id)),
                ("revoke_user", lambda: eng.revoke_user(user_id)),
                ("chat_history", lambda: eng.chat_history(user_id, room_id)),
                ("chat_clear", lambda: eng.chat_clear(user_id, room_id)),
                ("revoke_session_id", lambda: eng.revoke_session_id(user_id, room_id)),
            ]
            for name, call in calls:
                ok = user_ok and (room_ok or not name.startswith("chat_"))
                result, exc = await outcome(call())
                expect("ids", name, ok, exc, live=True, **inputs)
                if exc is None and result not in ([], 0, None, False):
                    raise broken("ids", f"{name} found something: {show(result)}", **inputs)
            await _no_write(ctx, "ids", "a read", **inputs)
    finally:
        if wrote:
            await ctx.clear()


async def _check_stored_data(ctx: RedisContext, src: Source) -> bool:
    """Session data through create and update on Redis: stored exactly as the reference
    JSON; a refused create writes nothing, a refused update changes nothing."""
    eng = ctx.engine
    data, change = gen_data(src, MAX_PAYLOAD), gen_data(src, MAX_PAYLOAD)
    first, second = data_verdict(data, MAX_PAYLOAD), data_verdict(change, MAX_PAYLOAD)
    inputs: dict[str, Any] = {"data": data, "update": change, "verdicts": (first, second)}
    new, exc = await outcome(eng.create(user_id="u-data", data=data))
    if not expect(
        "ids", "create(data)", first.ok, exc, too_large=first.too_large, live=True, **inputs
    ):
        await _no_write(ctx, "ids", "create(data)", **inputs)
        return False
    stored = await eng.validate(new.token)
    if stored is None or (first.ok and stored.data != first.value):
        raise broken("ids", "data did not round-trip", stored=stored, **inputs)
    updated, exc = await outcome(eng.update(new.token, data=change))
    ok = expect(
        "ids", "update(data)", second.ok, exc, too_large=second.too_large, live=True, **inputs
    )
    after = await eng.validate(new.token)
    if after is None:
        raise broken("ids", "the session died in an update", **inputs)
    if not ok and (after.version, after.data) != (stored.version, stored.data):
        raise broken("ids", "a refused update changed the session", after=after, **inputs)
    if ok and (
        after.version != stored.version + 1
        or (updated.version, updated.data) != (after.version, after.data)
        or (second.ok and after.data != second.value)
    ):
        raise broken("ids", "update did not store the data", after=after, **inputs)
    return True


async def check_chat(ctx: RedisContext, src: Source) -> None:
    """``chat_append`` with any message; ``chat_owned_by_sessions`` refusals write nothing."""
    owned = bool(src.integer(0, 1))
    eng = ctx.owned if owned else ctx.engine
    user_id, room_id = pick(src, ["u1", "ü:{x}", gen_id(src)]), pick(src, ["r1", "%", "a:b"])
    message = gen_data(src, MAX_MESSAGE)
    verdict = data_verdict(message, MAX_MESSAGE, none_ok=False)
    with_session = owned and bool(src.integer(0, 1))
    ok = all_kinds([verdict.ok, id_verdict(user_id)])
    inputs: dict[str, Any] = {
        "user_id": user_id,
        "room_id": room_id,
        "message": message,
        "owned": owned,
        "with_session": with_session,
        "verdict": verdict,
    }
    wrote = False
    try:
        if with_session and id_verdict(user_id):
            await eng.create(user_id=user_id)
            wrote = True
        n, exc = await outcome(eng.chat_append(user_id, room_id, message))
        if owned and not with_session and exc is None:
            wrote = True
            raise broken("chat", "chat_append without a live session was accepted", **inputs)
        if owned and not with_session and isinstance(exc, SessionNotFound):
            if leaked(exc, [TAG_SECRET]):
                raise broken("chat", "a secret is in the error text", **inputs)
            if ok is False:
                raise broken("chat", "SessionNotFound before refusing the arguments", **inputs)
            await _no_write(ctx, "chat", "chat_append (no session)", **inputs)
            return
        accepted = expect(
            "chat",
            "chat_append",
            ok,
            exc,
            too_large=verdict.too_large and ok is False and id_verdict(user_id),
            secrets=[TAG_SECRET],
            live=True,
            **inputs,
        )
        if not accepted:
            if not wrote:
                await _no_write(ctx, "chat", "chat_append", **inputs)
            return
        wrote = True
        history = await eng.chat_history(user_id, room_id)
        if n != 1 or len(history) != 1 or (verdict.ok and history != [verdict.value]):
            raise broken("chat", "the message did not round-trip", n=n, history=history, **inputs)
    finally:
        if wrote:
            await ctx.clear()


# -- target: settings ------------------------------------------------------------------


def _settings_secrets(values: dict[str, Any]) -> list[str]:
    out = [v for k, v in values.items() if k in ("password", "tag_secret") and type(v) is str]
    url = values.get("url")
    if isinstance(url, str) and "@" in url and ":" in url.split("@")[0]:
        out.append(url.split("@")[0].rsplit(":", 1)[1])
    return out


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("ENGINE_")}
    for k in saved:
        del os.environ[k]
    try:
        os.environ.update(values)
        yield
    finally:
        for k in [k for k in os.environ if k.upper().startswith("ENGINE_")]:
            del os.environ[k]
        os.environ.update(saved)


def _env_safe(text: str) -> str | None:
    if "\x00" in text or "=" in text:
        return None
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return text


def check_settings(src: Source) -> None:
    """``EngineSettings`` from keyword arguments or ``ENGINE_*`` variables, and the engine
    built from them: a ``ValidationError`` or settings within the documented bounds."""
    values: dict[str, Any] = dict(gen_secrets(src))
    for _ in range(src.integer(0, 5)):
        name = pick(src, SETTING_FIELDS) if src.integer(0, 7) else src.text(10)
        values[name] = gen_setting_value(src)
    secrets = _settings_secrets(values)
    from_env = src.integer(0, 2) == 0
    env: dict[str, str] = {}
    if from_env:
        for name, value in values.items():
            text = _env_safe(value if isinstance(value, str) else str(value))
            key = _env_safe(f"ENGINE_{name}".upper() if src.integer(0, 3) else f"ENGINE_{name}")
            if text is not None and key is not None and key.isprintable():
                env[key] = text
        secrets = _settings_secrets({k[7:].lower(): v for k, v in env.items()})
    inputs: dict[str, Any] = {"env" if from_env else "kwargs": env if from_env else values}

    def build() -> EngineSettings:
        if from_env:
            with _environment(env):
                return EngineSettings()
        return EngineSettings(**values)

    try:
        settings = build()
    except ValidationError as exc:
        if (s := leaked(exc, secrets)) is not None:
            raise broken("settings", "ValidationError shows a secret", secret=s, **inputs) from None
        return
    except Exception as exc:
        raise broken("settings", f"EngineSettings raised {show(exc)}", **inputs) from exc
    idle, absolute = settings.idle_ttl, settings.absolute_ttl
    if not (MIN_TTL <= idle <= absolute <= MAX_TTL):
        raise broken("settings", f"accepted idle_ttl={idle}, absolute_ttl={absolute}", **inputs)
    for name in ("chat_ttl", "command_timeout", "connect_timeout", "wait_timeout"):
        value = getattr(settings, name, 1.0)
        if not (value > 0 and math.isfinite(value)):
            raise broken("settings", f"accepted {name}={value}", **inputs)
    # SessionEngine preallocates the latency ring (8 bytes a call): an unbounded window
    # lets a setting exhaust memory before the engine even opens.
    if getattr(settings, "latency_window", 0) > 10_000_000:
        raise broken("settings", f"accepted latency_window={settings.latency_window}", **inputs)
    # Secrets stay out of the repr: SecretStr fields, and the url's password (redacted).
    # A "secret" that is also the value of a public field (a tag_secret of 'evict_oldest')
    # is in the repr for that field's sake: not a leak.
    public = " ".join(
        str(v)
        for k, v in settings.model_dump().items()
        if k not in ("url", "password", "tag_secret")
    )
    for text in (repr(settings), str(settings)):
        if any(len(s) >= 12 and s in text and s not in public for s in secrets):
            raise broken("settings", "repr(settings) shows a secret", **inputs)
    try:
        if from_env:
            with _environment(env):
                SessionEngine()
        else:
            SessionEngine(settings)
            SessionEngine(None, **values)
    except Exception as exc:
        if unexpected(exc) and not isinstance(exc, ValidationError):
            raise broken("settings", f"SessionEngine(...) raised {show(exc)}", **inputs) from exc
        if (s := leaked(exc, secrets)) is not None:
            raise broken("settings", "SessionEngine error shows a secret", **inputs) from None


# -- target: url -----------------------------------------------------------------------


class JailLoop(asyncio.SelectorEventLoop):
    """An event loop that connects nowhere: it records where the engine tried to connect
    and refuses, so any URL can be opened without reaching a real server."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[object, object]] = []

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        host = args[1] if len(args) > 1 else kwargs.get("host")
        port = args[2] if len(args) > 2 else kwargs.get("port")
        self.attempts.append((host, port))
        raise ConnectionRefusedError(111, "the fuzz jail refuses every connection")

    async def create_unix_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts.append((args[1] if len(args) > 1 else kwargs.get("path"), None))
        raise ConnectionRefusedError(111, "the fuzz jail refuses every connection")

    async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> Any:
        self.attempts.append((host, port))
        raise OSError("the fuzz jail resolves no name")


def _named_servers(url: str) -> set[tuple[str, int]] | None:
    """The servers a URL names, or ``None`` when any connection is an error (no redis
    scheme, no host where one was written). ``redis://`` alone means the local default."""
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            return None
        if not parts.netloc:
            bare = parts.path.strip("/")
            return (
                {("127.0.0.1", 6379), ("localhost", 6379)} if bare.isdigit() or not bare else None
            )
        port = parts.port or 6379
    except ValueError:
        return None
    host = parts.hostname or "127.0.0.1"
    return {(host, port)} | ({("127.0.0.1", port)} if host == "localhost" else set())


async def check_url(src: Source, loop: JailLoop) -> None:
    """``EngineSettings(url=...)`` and ``open()`` on a loop that connects nowhere: a clear
    error without the password (nor in ``repr(settings)``), and no connection to a server
    the URL does not name."""
    url, password = gen_url(src)
    secrets = [password, unquote(password)]
    inputs: dict[str, Any] = {"url": url}
    try:
        settings = EngineSettings(url=url, connect_timeout=0.05, command_timeout=0.05)
    except ValidationError as exc:
        if leaked(exc, secrets) is not None:
            raise broken("url", "ValidationError shows the password", **inputs) from None
        return
    for text in (repr(settings), str(settings)):
        if any(len(s) >= 12 and s in text for s in secrets):
            raise broken("url", "repr(settings) shows the password", **inputs)
    loop.attempts.clear()
    engine = SessionEngine(settings)
    try:
        await engine.open()
    except Exception as exc:
        if unexpected(exc):
            raise broken("url", f"open() raised {show(exc)}", **inputs) from exc
        if leaked(exc, secrets) is not None:
            raise broken("url", "open()'s error shows the password", error=exc, **inputs) from None
    else:
        raise broken("url", "open() succeeded with every connection refused", **inputs)
    finally:
        await engine.aclose()
    named = _named_servers(url) or set()
    for host, port in loop.attempts:
        if (host, port) not in named:
            raise broken(
                "url",
                f"open() connected to {host}:{port}, not named by the url",
                named=named,
                **inputs,
            )
