"""``python -m engine fuzz TARGET``: coverage-guided fuzzing of every public entry.

Each target turns fuzzer bytes into arguments of one family of public entries and checks
one invariant: the call gives a clear engine error (an ``EngineError``; for settings,
pydantic's ``ValidationError``) or a correct result, never another exception, never a
write after a refusal, never a secret (password, tag secret, the token given) in the
text of an error.

=========  ======  ==================================================================
target     Redis   entries
=========  ======  ==================================================================
token      no      ``parse_token``; ``validate``/``validate_many``/``get``/``revoke``/
                   ``update``/``rotate``/``revoke_user(except_token=)`` with any object:
                   what does not parse never reaches Redis
data       no      ``create``/``update`` arguments (data dicts and models, ids, state,
                   TTLs, expected_version): refused before any I/O, or accepted
settings   no      ``EngineSettings`` from keyword arguments and from ``ENGINE_*``
                   variables; ``SessionEngine(...)`` built from what is accepted
url        no      ``EngineSettings(url=...)`` and ``open()`` with odd URLs holding a
                   password, on an event loop that connects nowhere: a clear error without
                   the password, no connection to a server the URL does not name
http       no      ``engine.fastapi``'s ``require_session``/``optional_session``/
                   ``current_token``/``require_user`` behind a tiny app, with any
                   ``Authorization``/``Cookie`` bytes and a stub engine
ids        yes     user and room ids through create, rotate, list, revoke_user and chat,
                   round-tripped; a refusal leaves no key under the prefix
chat       yes     ``chat_append`` messages (and ``chat_owned_by_sessions``), read back
                   with ``chat_history``; a refusal leaves no key under the prefix
=========  ======  ==================================================================

Targets that need Redis start a local three-primary cluster (``LocalCluster``) unless
``--url`` names one (their keys live under a fresh prefix, deleted afterwards). Each
target runs in a child process: atheris instruments the engine's modules before they are
imported, and libFuzzer ends that process itself. Exit status: 0 when every target ran
its time without breaking an invariant, 1 otherwise (the input is printed and written to
the artifacts directory; ``--reproduce FILE`` runs it again).

The generators and checks are also driven by Hypothesis in ``tests/test_fuzz.py`` through
the same ``Source`` interface, so both fuzzers test the same invariants.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from ._errors import (
    EngineError,
    EngineUnavailable,
    InvalidArgument,
    PayloadTooLarge,
    SessionNotFound,
)
from ._models import Session, SessionState
from ._settings import MAX_TTL, EngineSettings
from ._tokens import parse_token

__all__ = [
    "MAX_ID_BYTES",
    "MAX_MESSAGE",
    "MAX_PAYLOAD",
    "TAG_SECRET",
    "TARGETS",
    "HttpApp",
    "InvariantBroken",
    "JailLoop",
    "RedisContext",
    "Source",
    "check_chat",
    "check_create_args",
    "check_http",
    "check_ids",
    "check_settings",
    "check_token",
    "check_url",
    "engine_fields",
    "main",
]

MIN_TTL: Final = 1.0  # the documented floor of every TTL, in seconds
ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
TOKEN_LEN: Final = 52
# Limits of the engines the targets build: small, so the boundaries are reachable.
MAX_ID_BYTES: Final = 48
MAX_PAYLOAD: Final = 300
MAX_MESSAGE: Final = 200
TAG_SECRET: Final = "tagsecret-7Qv3xZ9pL2"
PASSWORD: Final = "urlpassword-K8s2Mw5R"


class InvariantBroken(AssertionError):
    """An entry broke its contract; the message names the entry, the input and the answer."""


class Source(Protocol):
    """Where a generator's choices come from: libFuzzer bytes or a Hypothesis draw."""

    def integer(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""

    def any_int(self) -> int:
        """Any int, also far outside 64 bits."""

    def floating(self) -> float:
        """Any float, NaN and infinities included."""

    def text(self, max_len: int) -> str:
        """Any str of at most ``max_len`` code points, lone surrogates included."""

    def raw(self, max_len: int) -> bytes:
        """Any bytes, at most ``max_len``."""


class BytesSource:
    """A ``Source`` over atheris' ``FuzzedDataProvider``."""

    def __init__(self, provider: Any) -> None:
        self._p = provider

    def integer(self, lo: int, hi: int) -> int:
        return int(self._p.ConsumeIntInRange(lo, hi))

    def any_int(self) -> int:
        return int(self._p.ConsumeInt(self._p.ConsumeIntInRange(1, 24)))

    def floating(self) -> float:
        return float(self._p.ConsumeFloat())

    def text(self, max_len: int) -> str:
        return str(self._p.ConsumeUnicode(self._p.ConsumeIntInRange(0, max_len)))

    def raw(self, max_len: int) -> bytes:
        return bytes(self._p.ConsumeBytes(self._p.ConsumeIntInRange(0, max_len)))


def pick(src: Source, options: Sequence[Any]) -> Any:
    return options[src.integer(0, len(options) - 1)]


def show(value: object, limit: int = 300) -> str:
    """``repr`` that survives objects whose ``__repr__`` raises, cut to ``limit``."""
    try:
        text = repr(value)
    except Exception as exc:  # the evil objects do this on purpose
        text = f"<{type(value).__name__} whose repr raises {type(exc).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def broken(target: str, what: str, **inputs: object) -> InvariantBroken:
    lines = [f"[{target}] {what}"] + [f"  {k} = {show(v)}" for k, v in inputs.items()]
    return InvariantBroken("\n".join(lines))


def _error_texts(exc: BaseException) -> Iterator[str]:
    """``str`` and ``repr`` of an error and of every error it chains to (logs show them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for render in (str, repr):
            with contextlib.suppress(Exception):
                yield render(current)
        current = current.__cause__ or current.__context__


def leaked(exc: BaseException, secrets: Sequence[object]) -> str | None:
    """The first secret found in the error's text, if any. Only str secrets of 12+
    characters count: a shorter one could appear in a message by chance."""
    texts = list(_error_texts(exc))
    for secret in secrets:
        if type(secret) is str and len(secret) >= 12 and any(secret in t for t in texts):
            return secret
    return None


def _unexpected(exc: BaseException) -> bool:
    """Not an error the engine documents."""
    return not isinstance(exc, EngineError)


def _reached_io(exc: BaseException) -> bool:
    """An unopened engine's answer to a call that passed every argument check."""
    return isinstance(exc, EngineError) and not isinstance(exc, InvalidArgument | SessionNotFound)


# -- generators ------------------------------------------------------------------------


class _StrToken(str):
    """A str subclass: the parser may refuse it (it is not what ``new_token`` returns)."""

    __slots__ = ()


class _Evil:
    """An object every dunder of which raises: engines must not touch a token they refuse."""

    def __repr__(self) -> str:
        raise RuntimeError("repr of an evil object")

    __str__ = __repr__

    def __hash__(self) -> int:
        raise RuntimeError("hash of an evil object")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq of an evil object")

    def __len__(self) -> int:
        raise RuntimeError("len of an evil object")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("iter of an evil object")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def canonical_token(src: Source) -> str:
    tag = _b64((src.raw(6) + bytes(6))[:6])
    secret = _b64((src.raw(32) + bytes(32))[:32])
    return f"{tag}.{secret}"


def token_ok(token: object) -> bool:
    """Reference parser: what ``new_token`` can produce, decided by decoding and re-encoding
    (independent of ``parse_token``'s character checks)."""
    if not isinstance(token, str) or len(token) != TOKEN_LEN or not token.isascii():
        return False
    tag, dot, secret = token[:8], token[8], token[9:]
    if dot != ".":
        return False
    try:
        raw_tag = base64.b64decode(tag, altchars=b"-_", validate=True)
        raw = base64.b64decode(secret + "=", altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw_tag) == 6 and len(raw) == 32 and _b64(raw_tag) == tag and _b64(raw) == secret


def gen_token(src: Source) -> object:
    """Anything a client could send as a token, and objects no client could."""
    kind = src.integer(0, 9)
    if kind == 0:
        return canonical_token(src)
    if kind == 1:  # one edit away from a real token
        tok = canonical_token(src)
        pos = src.integer(0, TOKEN_LEN)
        ch = pick(src, [".", "=", "+", "/", "{", "}", ":", "\r", "\n", "\x00", " ", "é", "A"])
        return pick(src, [tok[:pos] + ch + tok[pos + 1 :], tok[:pos] + ch + tok[pos:]])
    if kind == 2:
        return src.text(80)
    if kind == 3:
        return "".join(ALPHABET[src.integer(0, 63)] for _ in range(8)) + (
            "." + "".join(pick(src, [*ALPHABET, "."]) for _ in range(43))
        )
    if kind == 4:
        tok = canonical_token(src)
        pad = pick(src, [" ", "\r\n", "\x00", "\t", "\u00a0", "\ufeff"])
        return pick(src, [tok + pad, pad + tok, tok.upper(), tok.replace(".", "", 1)])
    if kind == 5:
        return pick(src, [canonical_token(src).encode(), src.raw(60)])
    if kind == 6:
        tok = canonical_token(src)
        return pick(
            src,
            [
                None,
                src.any_int(),
                src.floating(),
                True,
                [tok],
                (tok,),
                {tok: 1},
                bytearray(tok.encode()),
                _StrToken(tok),
                object(),
                _Evil(),
                SessionState.ACTIVE,
            ],
        )
    if kind == 7:  # huge: the length check comes first
        return pick(src, ["A" * src.integer(53, 200_000), canonical_token(src) * 3])
    if kind == 8:  # a non-canonical last character (the two low bits set)
        tok = canonical_token(src)
        return tok[:-1] + ALPHABET[src.integer(0, 63) | 1]
    return pick(src, ["", ".", "Bearer " + canonical_token(src), "AAAAAAAA."])


_SPECIAL_FLOATS: Final = (math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 1e16, 0.1)


def gen_key(src: Source) -> object:
    if src.integer(0, 5):
        return src.text(8)
    return pick(src, [src.any_int(), None, math.nan, ("t",), True, b"k", 1.5, _StrToken("k")])


def gen_json(src: Source, depth: int = 0) -> object:
    """A JSON-like value, now and then with something JSON cannot carry."""
    kind = src.integer(0, 12 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return bool(src.integer(0, 1))
    if kind == 2:
        return src.integer(-1000, 1000)
    if kind == 3:
        return src.any_int()
    if kind == 4:
        return src.floating()
    if kind == 5:
        return src.text(20)
    if kind == 6:
        return pick(src, _SPECIAL_FLOATS)
    if kind == 7:
        return "x" * src.integer(0, 400)
    if kind == 8:
        return [gen_json(src, depth + 1) for _ in range(src.integer(0, 3))]
    if kind == 9:
        return tuple(gen_json(src, depth + 1) for _ in range(src.integer(0, 2)))
    if kind in (10, 11):
        return {gen_key(src): gen_json(src, depth + 1) for _ in range(src.integer(0, 3))}
    return pick(
        src,
        [b"bytes", {1, 2}, object(), Decimal("1.5"), complex(1, 2), datetime(2020, 1, 1)],
    )


class _Doc(BaseModel):
    name: str
    score: float
    tags: list[str] = []


class _DocConstants(BaseModel):
    """Writes NaN and Infinity as bare constants: JSON cannot carry that."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    score: float


class _ListRoot(RootModel[list[Any]]):
    pass


class _DictRoot(RootModel[dict[str, Any]]):
    pass


class _StrRoot(RootModel[str]):
    pass


def gen_model(src: Source) -> object:
    kind = src.integer(0, 4)
    try:
        if kind == 0:
            return _Doc(name=src.text(20), score=src.floating(), tags=[src.text(5)])
        if kind == 1:
            return _DocConstants(score=pick(src, [src.floating(), *_SPECIAL_FLOATS]))
        if kind == 2:
            return _ListRoot([gen_json(src, 2) for _ in range(src.integer(0, 3))])
        if kind == 3:
            return _DictRoot({src.text(6): gen_json(src, 2) for _ in range(src.integer(0, 3))})
        return _StrRoot(src.text(10))
    except ValidationError:
        return _Doc(name="", score=0.0)


def gen_data(src: Source, limit: int) -> object:
    """Session data or a chat message, valid or not, sometimes right at the size limit."""
    kind = src.integer(0, 9)
    if kind == 0:
        return None
    if kind <= 4:
        return {gen_key(src): gen_json(src) for _ in range(src.integer(0, 4))}
    if kind == 5:
        return gen_model(src)
    if kind == 6:  # around the limit: {"k":"xx..."} is len(x) + 8 bytes
        return {"k": "x" * max(0, limit - 8 + src.integer(-2, 2))}
    if kind == 7:
        return pick(src, [[1, 2], "text", 5, b"{}", ("a", 1), {"a"}, _Evil()])
    if kind == 8:
        d: dict[Any, Any] = OrderedDict((src.text(5), gen_json(src, 3)) for _ in range(2))
        return d
    return {"nested": {"deep": [gen_json(src, 2), {"x": pick(src, _SPECIAL_FLOATS)}]}}


def gen_id(src: Source, max_bytes: int = MAX_ID_BYTES) -> object:
    """A user or room id: any text, the key syntax's own characters, the byte limit."""
    kind = src.integer(0, 7)
    if kind <= 1:
        return src.text(12)
    if kind == 2:
        return "".join(
            pick(src, [":", "{", "}", "%", "|", "\r\n", "\x00", " ", "a", "é", "*"])
            for _ in range(src.integer(1, 6))
        )
    if kind == 3:  # right at the byte limit, with 1-, 2- and 4-byte characters
        ch = pick(src, ["a", "é", "😀"])
        n = max(1, max_bytes // len(ch.encode()) + src.integer(-1, 1))
        return ch * n
    if kind == 4:
        return pick(src, ["", "\ud800", "a\udcff", "u1", "U1", "u1 "])
    if kind == 5:
        return pick(src, [None, 1, b"u1", ["u1"], 0.5, _StrToken("u1"), object()])
    return "u" + src.text(4)


def gen_ttl(src: Source) -> object:
    kind = src.integer(0, 5)
    if kind == 0:
        return None
    if kind == 1:
        return src.floating()
    if kind == 2:
        return src.any_int()
    if kind == 3:
        return pick(src, [0, 0.5, 0.999, 1, 2, 60, MAX_TTL, MAX_TTL + 1, True, "60", -1, 10**400])
    return src.integer(1, 100_000) / 10


# -- verdicts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What an argument should get: ``ok`` True (accepted), False (refused), None (either)."""

    ok: bool | None
    too_large: bool = False  # refused only for its size: PayloadTooLarge
    value: Any = None  # the JSON the engine must store, when accepted
    why: str = ""


def _json_kind(value: object, depth: int = 0) -> bool | None:
    """Can JSON carry this exactly? False: never; None: the engine may go either way."""
    if depth > 200:
        return None
    if value is None or type(value) in (bool, str):
        if type(value) is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
        return True
    if type(value) is int:
        return True if -(2**63) <= value < 2**64 else None
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return _all_kinds(_json_kind(v, depth + 1) for v in value)
    if isinstance(value, dict):
        kinds = [_json_kind(v, depth + 1) for v in value.values()]
        for key in value:
            if type(key) is not str:
                kinds.append(None if isinstance(key, str) else False)
            else:
                kinds.append(_json_kind(key, depth + 1))
        return _all_kinds(kinds)
    if isinstance(value, str | int | float | datetime):  # orjson writes these too
        return None
    return False


def _all_kinds(kinds: Iterable[bool | None]) -> bool | None:
    out: bool | None = True
    for k in kinds:
        if k is False:
            return False
        if k is None:
            out = None
    return out


def _size_verdict(sizes: Sequence[int], limit: int, value: Any) -> Verdict:
    if all(s <= limit for s in sizes):
        return Verdict(True, value=value)
    if all(s > limit for s in sizes):
        return Verdict(False, too_large=True, why=f"{min(sizes)} bytes > {limit}")
    return Verdict(None, why="encoders disagree on the size")


def _non_finite(value: object, depth: int = 0) -> bool:
    """A NaN or infinity anywhere inside (a model's default JSON writes them as null)."""
    if type(value) is float:
        return not math.isfinite(value)
    if depth > 100:
        return False
    if isinstance(value, dict):
        return any(_non_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(v, depth + 1) for v in value)
    return False


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def data_verdict(data: object, limit: int, *, none_ok: bool = True) -> Verdict:
    """The reference answer for session data / a chat message."""
    if data is None:
        return Verdict(True, value={}) if none_ok else Verdict(None)
    if isinstance(data, BaseModel):
        try:
            text = data.model_dump_json()
        except Exception:
            return Verdict(False, why="the model cannot be serialised")
        try:
            parsed = json.loads(text, parse_constant=_no_constants)
        except ValueError:
            return Verdict(False, why="the model writes NaN or Infinity")
        if not isinstance(parsed, dict):
            return Verdict(False, why="the model is not a JSON object")
        if _non_finite(data.model_dump()):
            return Verdict(None, why="NaN written as null by the model")
        if _json_kind(parsed) is not True:  # e.g. ints past 64 bits: orjson refuses them
            return Verdict(None, why="the engine's encoder may refuse it")
        sizes = [len(text.encode()), len(orjson.dumps(parsed))]
        return _size_verdict(sizes, limit, parsed)
    if not isinstance(data, dict):
        return Verdict(False, why="not a dict or a model")
    kind = _json_kind(data)
    if kind is not True:
        return Verdict(kind, why="JSON cannot carry it" if kind is False else "unsure")
    try:
        encoded = orjson.dumps(data)
        other = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return Verdict(None, why="an encoder refuses it")
    return _size_verdict([len(encoded), len(other.encode())], limit, orjson.loads(encoded))


def id_verdict(value: object, max_bytes: int = MAX_ID_BYTES) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        return len(value.encode("utf-8")) <= max_bytes
    except UnicodeEncodeError:
        return False


def ttl_verdict(value: object) -> bool | None:
    if value is None:
        return True
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    if not math.isfinite(number) or number < MIN_TTL:
        return False
    if number > MAX_TTL:
        return None if number < MAX_TTL + 0.001 else False
    return True


def expect(
    target: str,
    what: str,
    ok: bool | None,
    outcome: BaseException | None,
    *,
    too_large: bool = False,
    secrets: Sequence[object] = (),
    live: bool = False,
    **inputs: Any,
) -> bool:
    """Hold an outcome (``None``: returned normally) to a verdict; True when accepted.

    Refusals must be ``InvalidArgument`` (``PayloadTooLarge`` when only the size is wrong);
    anything not an ``EngineError`` breaks the invariant whatever the verdict. ``live``:
    the engine is open, so an accepted call must return normally (otherwise it must get
    as far as I/O, which an engine that is not open refuses with a plain EngineError).
    """
    if outcome is not None:
        if _unexpected(outcome):
            raise broken(target, f"{what} raised {show(outcome)}", **inputs) from outcome
        if (secret := leaked(outcome, secrets)) is not None:
            raise broken(target, f"{what}: a secret is in the error text", secret=secret, **inputs)
    refused = isinstance(outcome, InvalidArgument)
    if ok is True and refused:
        raise broken(target, f"{what} refused valid arguments: {show(outcome)}", **inputs)
    if ok is False and not refused:
        answer = "accepted them" if outcome is None else f"raised {show(outcome)}"
        raise broken(target, f"{what} {answer} instead of refusing", **inputs)
    if ok is False and too_large and not isinstance(outcome, PayloadTooLarge):
        raise broken(target, f"{what} raised {show(outcome)}, not PayloadTooLarge", **inputs)
    if outcome is not None and not refused and (live or not _reached_io(outcome)):
        raise broken(target, f"{what}: unexpected {show(outcome)}", **inputs)
    return not refused


# -- target: token ---------------------------------------------------------------------


async def _outcome(call: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    try:
        return await call, None
    except Exception as exc:
        return None, exc


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
) -> None:
    """Every entry that takes a token, with anything as the token.

    ``live``: ``engine`` is open (no session has these random tokens, so: None, False,
    SessionNotFound, and no key written). Otherwise the engine is not open: a token that
    does not parse gets the same answers, one that does reaches I/O (the "not open" error).
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
            if _unexpected(exc):
                raise broken("token", f"{name} raised {show(exc)}", **args) from exc
            if (s := leaked(exc, secrets)) is not None:
                raise broken("token", f"{name}: the token is in the error text", secret=s, **args)
        if not live and exc is not None and _reached_io(exc):
            return  # an engine that is not open may say so before looking at the token
        if io and not live and not either:
            raise broken("token", f"{name} answered without I/O: {show(result)}", **args)
        if want is SessionNotFound:
            if not isinstance(exc, SessionNotFound):
                raise broken("token", f"{name} gave {show(result)} / {show(exc)}", **args)
        elif exc is not None or result != want:
            raise broken("token", f"{name} gave {show(result)} / {show(exc)}, not {want}", **args)

    r, e = await _outcome(engine.validate(token))
    judge("validate", r, e, None, parses)
    states = pick(src, [None, {SessionState.ACTIVE}, list(SessionState)])
    r, e = await _outcome(engine.validate(token, states))
    judge("validate(states)", r, e, None, parses)
    r, e = await _outcome(engine.validate_many(many_arg))
    judge("validate_many", r, e, [None, None], parses or token_ok(other))
    r, e = await _outcome(engine.get(token))
    judge("get", r, e, None, parses)
    r, e = await _outcome(engine.revoke(token))
    judge("revoke", r, e, False, parses)
    r, e = await _outcome(engine.update(token, data={"a": 1}))
    judge("update", r, e, SessionNotFound, parses)
    r, e = await _outcome(engine.rotate(token))
    judge("rotate", r, e, SessionNotFound, parses)
    r, e = await _outcome(engine.revoke_user(user, except_token=token))
    judge("revoke_user(except_token)", r, e, 0, True)
    if keys is not None and (found := await keys()):
        raise broken("token", "a token call wrote keys", token=token, keys=found[:5])


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
        ok = _all_kinds([dv.ok, *parts])
        _, exc = await _outcome(
            engine.create(
                user_id=user_id, data=data, state=state, idle_ttl=idle, absolute_ttl=absolute
            )
        )
        expect(
            "data",
            "create",
            ok,
            exc,
            too_large=dv.too_large and _all_kinds(parts) is True,
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
    ok = _all_kinds([dv.ok, *parts])
    _, exc = await _outcome(engine.update(token, data=data, state=state, expected_version=version))
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
            new, exc = await _outcome(eng.create(user_id=user_id, data={"n": 1}))
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
            rotated, exc = await _outcome(eng.rotate(new.token, user_id=user_id))
            if not expect("ids", "rotate", user_ok, exc, secrets=[new.token], live=True, **inputs):
                if await eng.validate(new.token) is None:
                    raise broken("ids", "a refused rotate killed the session", **inputs)
                return
            if rotated.session.user_id != user_id or rotated.session.data != {"n": 2}:
                raise broken("ids", "rotate lost the owner or data", got=rotated, **inputs)
            if await eng.validate(new.token) is not None:
                raise broken("ids", "the old token still works after rotate", **inputs)
        elif op in (2, 3):  # chat: append, read back, never share a key with another pair
            n, exc = await _outcome(eng.chat_append(user_id, room_id, {"m": "hi"}))
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
                result, exc = await _outcome(call())
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
    new, exc = await _outcome(eng.create(user_id="u-data", data=data))
    if not expect(
        "ids", "create(data)", first.ok, exc, too_large=first.too_large, live=True, **inputs
    ):
        await _no_write(ctx, "ids", "create(data)", **inputs)
        return False
    stored = await eng.validate(new.token)
    if stored is None or (first.ok and stored.data != first.value):
        raise broken("ids", "data did not round-trip", stored=stored, **inputs)
    updated, exc = await _outcome(eng.update(new.token, data=change))
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
    ok = _all_kinds([verdict.ok, id_verdict(user_id)])
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
        n, exc = await _outcome(eng.chat_append(user_id, room_id, message))
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

_FIELDS: Final = tuple(EngineSettings.model_fields)
_SETTING_STRINGS: Final = (
    "",
    "0",
    "-1",
    "0.5",
    "0.999",
    "1",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "1_000",
    " 5 ",
    "0x10",
    "true",
    "refuse",
    "evict_oldest",
    "rediss://h:1",
    "a{b}",
    str(MAX_TTL),
    str(MAX_TTL + 1),
    "315360000.0001",
)


def gen_setting_value(src: Source) -> object:
    kind = src.integer(0, 8)
    if kind == 0:
        return src.text(12)
    if kind == 1:
        return pick(src, _SETTING_STRINGS)
    if kind == 2:
        return src.any_int()
    if kind == 3:
        return src.floating()
    if kind == 4:
        return pick(src, [True, False, None, b"1", [1], {"a": 1}])
    if kind == 5:
        return pick(src, [0.999, 1.0, 1, MAX_TTL, 1e-9, 2, 100, 1e300])
    return src.integer(0, 100_000) / 10


def gen_secrets(src: Source) -> dict[str, str]:
    """A password and a tag secret (valid values, so the error is about something else)."""
    stamp = src.raw(6).hex()
    out: dict[str, str] = {}
    if src.integer(0, 1):
        out["password"] = f"pw-secret-{stamp}"
    if src.integer(0, 1):
        out["tag_secret"] = f"ts-secret-{stamp}"
    if src.integer(0, 1):
        out["url"] = f"redis://admin:{PASSWORD}{stamp}@127.0.0.1:7000"
    return out


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
    from ._engine import SessionEngine  # noqa: PLC0415 (it imports this module's peers)

    values: dict[str, Any] = dict(gen_secrets(src))
    for _ in range(src.integer(0, 5)):
        name = pick(src, _FIELDS) if src.integer(0, 7) else src.text(10)
        values[name] = gen_setting_value(src)
    secrets = _settings_secrets(values)
    from_env = bool(src.integer(0, 2) == 0)
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
    # SecretStr fields stay hidden (the url is a plain field: its password shows).
    hidden = [settings.password, settings.tag_secret]
    plain = [s.get_secret_value() for s in hidden if s is not None]
    for text in (repr(settings), str(settings)):
        if any(len(s) >= 12 and s in text for s in plain):
            raise broken("settings", "repr(settings) shows a secret", **inputs)
    try:
        if from_env:
            with _environment(env):
                SessionEngine()
        else:
            SessionEngine(settings)
            SessionEngine(None, **values)
    except Exception as exc:
        if _unexpected(exc) and not isinstance(exc, ValidationError):
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


def gen_url(src: Source) -> tuple[str, str]:
    """A Redis URL with a password, around the parser's edges; returns (url, password)."""
    scheme = pick(src, ["redis://", "rediss://", "REDIS://", "unix://", "http://", "://", ""])
    user = pick(src, ["", "admin", src.text(6)])
    odd = pick(src, ["", "%", "%zz", "%41", "@", ":", "/", "?", "#", "[", " ", "\x00", "é"])
    password = f"pw{src.raw(4).hex()}Secret{odd}{pick(src, ['', src.text(3)])}"
    host = pick(src, ["127.0.0.1", "localhost", "[::1]", "[::1", "::1", "", "10.0.0.1:1"])
    port = pick(src, [":7000", ":7000", "", ":0", ":99999", ":-1", ":abc", ": 1", ":1:2"])
    tail = pick(src, ["", "/", "/0", "/abc", "/99999", "/0?db=1", "?password=x", "#f"])
    auth = pick(src, [f"{user}:{password}@", f":{password}@", f"{password}@", ""])
    return f"{scheme}{auth}{host}{port}{tail}", password


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
    from ._engine import SessionEngine  # noqa: PLC0415

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
        if _unexpected(exc):
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


# -- target: http ----------------------------------------------------------------------


class StubEngine:
    """Enough of a ``SessionEngine`` for the FastAPI dependencies: answers set per request."""

    def __init__(self) -> None:
        self.mode = "none"  # "valid", "none" or "unavailable"
        self.user = "fuzz-user"
        self.calls: list[object] = []

    def _answer(self, token: object) -> Session | None:
        self.calls.append(token)
        if self.mode == "unavailable":
            raise EngineUnavailable("stub: no answer in time")
        if self.mode == "none":
            return None
        now = datetime.now(UTC)
        return Session(
            session_id="S" * 22,
            user_id=self.user,
            state=SessionState.ACTIVE,
            data={},
            created_at=now,
            expires_at=now + timedelta(minutes=30),
            absolute_expires_at=now + timedelta(days=1),
            version=0,
        )

    async def validate(self, token: object, states: object = None) -> Session | None:
        return self._answer(token)

    async def get(self, token: object) -> Session | None:
        return self._answer(token)

    async def validate_many(self, tokens: Any, states: object = None) -> list[Session | None]:
        return [self._answer(t) for t in tokens]

    async def open(self) -> StubEngine:
        return self

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> StubEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class HttpApp:
    """A tiny FastAPI app on the public dependencies, driven over raw ASGI (so any header
    bytes reach it), with its lifespan entered once."""

    def __init__(self) -> None:
        from fastapi import Depends, FastAPI  # noqa: PLC0415 (an optional extra)

        from . import fastapi as ef  # noqa: PLC0415

        self.stub = StubEngine()
        # The session cookie's name, from the documented attribute of the default auth.
        self.cookie = str(getattr(ef.default_auth, "cookie_name", "session")).encode()
        app = FastAPI(lifespan=ef.engine_lifespan(engine=self.stub))  # type: ignore[arg-type]
        # Depends as default values: this module's annotations are strings, and FastAPI
        # resolves them in the module's globals, where Annotated/Depends are not.
        need = Depends(ef.require_session)
        maybe = Depends(ef.optional_session)
        raw = Depends(ef.current_token)
        owner = Depends(ef.require_user("fuzz-user"))

        @app.get("/require")
        async def require(session: Session = need) -> Any:
            return {"user": session.user_id}

        @app.get("/optional")
        async def optional(session: Session | None = maybe) -> Any:
            return {"user": session.user_id if session else None}

        @app.get("/token")
        async def token(tok: str = raw) -> Any:
            return {"token": tok}

        @app.get("/user")
        async def user(session: Session = owner) -> Any:
            return {"user": session.user_id}

        self.app = app
        self._shutdown: asyncio.Event | None = None
        self._lifespan: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = asyncio.Event()
        self._shutdown = shutdown = asyncio.Event()
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            if not sent:
                sent.append("startup")
                return {"type": "lifespan.startup"}
            await shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"lifespan failed: {message}")
            if message["type"] == "lifespan.startup.complete":
                started.set()

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(started.wait(), 10)

    async def stop(self) -> None:
        if self._shutdown is not None and self._lifespan is not None:
            self._shutdown.set()
            await asyncio.wait_for(self._lifespan, 10)

    async def request(
        self, path: str, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
            "state": {},
        }
        status = 0
        out_headers: dict[bytes, bytes] = {}
        body = b""

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers.update((k.lower(), v) for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")

        await self.app(scope, receive, send)  # type: ignore[arg-type]
        return status, out_headers, body


def gen_headers(src: Source, cookie: bytes) -> tuple[list[tuple[bytes, bytes]], str]:
    """Request headers around a token: Bearer and cookie forms, duplicates, junk bytes.
    ``cookie``: the session cookie's name."""
    name_eq = pick(src, [cookie, cookie, b"session", b"__Host-session", b"SESSION"]) + b"="
    tok_obj = gen_token(src) if src.integer(0, 2) == 0 else canonical_token(src)
    token = tok_obj if isinstance(tok_obj, str) else canonical_token(src)
    raw_tok = token.encode("utf-8", "surrogatepass")
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(src.integer(0, 3)):
        name = pick(src, [b"authorization", b"authorization", b"cookie", b"cookie", b"x-other"])
        value = pick(
            src,
            [
                b"Bearer " + raw_tok,
                b"bearer " + raw_tok,
                b"BEARER  " + raw_tok + b" ",
                b"Basic " + raw_tok,
                b"Bearer",
                b"Bearer ",
                raw_tok,
                name_eq + raw_tok,
                b"a=b; " + name_eq + raw_tok + b"; c=d",
                name_eq + raw_tok + b"; " + name_eq + b"x",
                name_eq + b'"' + raw_tok + b'"',
                name_eq,
                src.raw(80),
                b"Bearer " + src.raw(60),
                name_eq + src.raw(60),
            ],
        )
        headers.append((name, value))
    return headers, token


async def check_http(http: HttpApp, src: Source) -> None:
    """Any Authorization/Cookie bytes: 200/401/403/503 as documented, never 500, the
    token handed to the engine is a str from the request, never echoed in a refusal."""
    headers, token = gen_headers(src, http.cookie)
    mode = pick(src, ["valid", "none", "unavailable"])
    http.stub.user = pick(src, ["fuzz-user", "someone-else"])
    http.stub.mode = mode
    inputs: dict[str, Any] = {"headers": headers, "mode": mode, "user": http.stub.user}
    answers: dict[str, tuple[int, dict[bytes, bytes], bytes]] = {}
    calls: dict[str, list[object]] = {}
    for path in ("/token", "/require", "/optional", "/user"):
        http.stub.calls = []
        try:
            answers[path] = await http.request(path, headers)
        except Exception as exc:
            raise broken("http", f"GET {path} raised {show(exc)}", **inputs) from exc
        calls[path] = http.stub.calls
    text = b"\n".join(v for _, v in headers).decode("latin-1")

    status, hdrs, body = answers["/token"]
    if status not in (200, 401):
        raise broken("http", f"/token answered {status}", body=body, **inputs)
    given: object = json.loads(body)["token"] if status == 200 else None
    seen = calls["/require"]
    if len(seen) > 1:
        raise broken("http", f"/require validated {len(seen)} times", **inputs)
    if seen != ([given] if given is not None else []):
        raise broken(
            "http",
            "/require validated another token than /token returned",
            token_route=given,
            validated=seen,
            **inputs,
        )
    if given is not None:
        if type(given) is not str or not given:
            raise broken("http", f"the engine was handed {show(given)}", **inputs)
        if given not in text and '"' not in text and "\\" not in text:
            raise broken("http", f"the token {show(given)} is not in the request", **inputs)
    _check_known_forms(headers, token, given, http.cookie, inputs)

    want = {
        "/require": {"valid": 200, "none": 401, "unavailable": 503},
        "/optional": {"valid": 200, "none": 200, "unavailable": 503},
        "/user": {
            "valid": 200 if http.stub.user == "fuzz-user" else 403,
            "none": 401,
            "unavailable": 503,
        },
    }
    for path, table in want.items():
        status, hdrs, body = answers[path]
        expected = table[mode] if given is not None else (200 if path == "/optional" else 401)
        if status != expected:
            raise broken(
                "http", f"GET {path} answered {status}, not {expected}", body=body, **inputs
            )
        if status == 401 and b"bearer" not in hdrs.get(b"www-authenticate", b"").lower():
            raise broken("http", f"GET {path}: 401 without a Bearer challenge", **inputs)
        if status == 503 and b"retry-after" not in hdrs:
            raise broken("http", f"GET {path}: 503 without Retry-After", **inputs)
        if (
            status == 401
            and given is not None
            and b"invalid_token" not in hdrs.get(b"www-authenticate", b"")
        ):
            raise broken("http", f"GET {path}: 401 for a bad token without invalid_token", **inputs)
        if status != 200 and isinstance(given, str) and len(given) >= 12:
            shown = body + b"".join(hdrs.values())
            if given.encode("utf-8", "surrogatepass") in shown:
                raise broken("http", f"GET {path}: the refused token is echoed", **inputs)


def _check_known_forms(
    headers: list[tuple[bytes, bytes]],
    token: str,
    given: object,
    cookie: bytes,
    inputs: dict[str, object],
) -> None:
    """The documented forms must be read: ``Authorization: Bearer <t>`` first, then the
    session cookie; no header at all means no token."""
    auth = [v for k, v in headers if k == b"authorization"]
    cookies = [v for k, v in headers if k == b"cookie"]
    if not token_ok(token):
        return
    raw = token.encode()
    if auth == [b"Bearer " + raw] and given != token:
        raise broken("http", "a plain Bearer token was not read", got=given, **inputs)
    if not auth and cookies == [cookie + b"=" + raw] and given != token:
        raise broken("http", "a plain session cookie was not read", got=given, **inputs)
    if not auth and not cookies and given is not None:
        raise broken("http", "a token was found in a request without one", got=given, **inputs)


# -- command line ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    redis: bool
    text: str


TARGETS: Final = {
    "token": Target(False, "parse_token and every entry taking a token, any object"),
    "data": Target(False, "create/update arguments: data, ids, state, TTLs, versions"),
    "settings": Target(False, "EngineSettings from kwargs and ENGINE_* variables"),
    "url": Target(False, "Redis URLs with passwords: EngineSettings(url=...) and open()"),
    "http": Target(False, "engine.fastapi dependencies with any Authorization/Cookie bytes"),
    "ids": Target(True, "user and room ids through every entry, round-tripped (Redis)"),
    "chat": Target(True, "chat_append messages, owned-by-sessions refusals (Redis)"),
}

# The child process: instrument the engine's modules (not this one) before importing them.
_WORKER: Final = """\
import sys
import atheris
with atheris.instrument_imports(include=["engine"], exclude=["engine._fuzz"]):
    import engine
    import engine._engine, engine._tokens, engine._keys, engine._settings, engine._models
    try:
        import engine.fastapi
    except ImportError:
        pass
from engine._fuzz import _worker
sys.exit(_worker(sys.argv[1:]))
"""


def _primaries(url: str) -> list[Any]:
    import redis  # noqa: PLC0415 (only the Redis targets need it)

    seed = redis.Redis.from_url(url, socket_timeout=5)
    try:
        slots: Any = seed.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        return [seed]
    seed.close()
    kwargs = seed.connection_pool.connection_kwargs
    seen = {
        (s[2][0].decode() if isinstance(s[2][0], bytes) else s[2][0], int(s[2][1])) for s in slots
    }
    return [
        redis.Redis(
            host=h,
            port=p,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            socket_timeout=5,
        )
        for h, p in sorted(seen)
    ]


def _scan(clients: list[Any], prefixes: Sequence[str]) -> list[bytes]:
    return [
        key
        for client in clients
        for prefix in prefixes
        for key in client.scan_iter(match=f"{prefix}:*", count=1000)
    ]


def delete_prefixes(url: str, prefixes: Sequence[str]) -> int:
    """Delete every key under the prefixes on every primary; returns how many."""
    clients = _primaries(url)
    try:
        keys = [(c, k) for c in clients for p in prefixes for k in c.scan_iter(match=f"{p}:*")]
        return sum(int(c.unlink(k)) for c, k in keys)
    finally:
        for c in clients:
            c.close()


def _setup(target: str, url: str | None, prefix: str) -> Callable[[bytes], None]:
    """Build the target's state once and return libFuzzer's ``TestOneInput``."""
    atheris: Any = importlib.import_module("atheris")
    from ._engine import SessionEngine  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    run = loop.run_until_complete

    def source(data: bytes) -> Source:
        return BytesSource(atheris.FuzzedDataProvider(data))

    if target == "token":
        idle = SessionEngine(EngineSettings(tag_secret=TAG_SECRET))
        return lambda data: run(check_token(idle, source(data), live=False))
    if target == "data":
        idle = SessionEngine(EngineSettings(**engine_fields()))
        return lambda data: run(check_create_args(idle, source(data)))
    if target == "settings":
        return lambda data: check_settings(source(data))
    if target == "url":
        jail = JailLoop()
        return lambda data: jail.run_until_complete(check_url(source(data), jail))
    if target == "http":
        http = HttpApp()
        run(http.start())
        return lambda data: run(check_http(http, source(data)))
    assert url is not None
    fields = engine_fields()
    eng = run(SessionEngine(EngineSettings(url=url, key_prefix=prefix, **fields)).open())
    owned = run(
        SessionEngine(
            EngineSettings(url=url, key_prefix=f"{prefix}o", chat_owned_by_sessions=True, **fields)
        ).open()
    )
    clients = _primaries(url)
    prefixes = (prefix, f"{prefix}o")

    async def keys() -> list[bytes]:
        return _scan(clients, prefixes)

    async def clear() -> None:
        for client in clients:
            for key in _scan([client], prefixes):
                client.unlink(key)

    ctx = RedisContext(engine=eng, owned=owned, keys=keys, clear=clear)
    check = check_ids if target == "ids" else check_chat
    return lambda data: run(check(ctx, source(data)))


def _worker(argv: list[str]) -> int:
    """The child: ``TARGET [--url URL --prefix P] -- libFuzzer arguments``."""
    parser = argparse.ArgumentParser(prog="engine._fuzz worker")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--url")
    parser.add_argument("--prefix", default="fuzz")
    args, libfuzzer = parser.parse_known_args(argv)
    atheris: Any = importlib.import_module("atheris")
    test_one_input = _setup(args.target, args.url, args.prefix)
    atheris.Setup([sys.argv[0], *[a for a in libfuzzer if a != "--"]], test_one_input)
    atheris.Fuzz()  # libFuzzer exits the process: 0 when the time is up, non-zero on a failure
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine fuzz TARGET [--seconds N]``."""
    targets = "\n".join(
        f"  {name:<9}{'(Redis) ' if t.redis else ''}{t.text}" for name, t in TARGETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m engine fuzz",
        description="Coverage-guided fuzzing (atheris/libFuzzer) of the engine's public "
        "entries: each input must get a clear engine error or a correct result, never "
        "another exception, never a write after a refusal, never a secret in an error.",
        epilog=f"targets:\n{targets}\n  all      every target in turn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, default=10, help="per target (default 10)")
    parser.add_argument("--runs", type=int, help="stop after this many inputs instead")
    parser.add_argument("--url", help="a cluster for the Redis targets (default: start one)")
    parser.add_argument(
        "--artifacts", help="where failing inputs are written (default: a temporary directory)"
    )
    parser.add_argument("--reproduce", metavar="FILE", help="run one saved input and stop")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("atheris") is None:
        print("atheris is not installed: pip install 'redis-session-engine[dev]'", file=sys.stderr)
        return 2
    names = list(TARGETS) if args.target == "all" else [args.target]
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="engine-fuzz-")
    os.makedirs(artifacts, exist_ok=True)
    libfuzzer = [f"-artifact_prefix={os.path.join(artifacts, '')}", "-timeout=60"]
    if args.reproduce:
        libfuzzer.append(args.reproduce)
    elif args.runs is not None:
        libfuzzer.append(f"-runs={args.runs}")
    else:
        libfuzzer.append(f"-max_total_time={args.seconds}")
    # A worker that outlives its time by minutes hangs (libFuzzer ends it on time).
    limit = None if args.runs is not None else args.seconds + 300
    failed: list[str] = []
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None and any(TARGETS[n].redis for n in names):
            from .cluster import LocalCluster  # noqa: PLC0415

            url = stack.enter_context(LocalCluster(primaries=3, replicas_per_primary=0)).url
        for name in names:
            prefix = f"fz{os.urandom(4).hex()}"
            command = [sys.executable, "-c", _WORKER, name]
            if TARGETS[name].redis:
                command += ["--url", str(url), "--prefix", prefix]
            print(f"== fuzz {name} ==", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                code = subprocess.run(
                    [*command, "--", *libfuzzer], check=False, timeout=limit
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
            finally:
                if TARGETS[name].redis and url is not None:
                    with contextlib.suppress(Exception):
                        delete_prefixes(str(url), [prefix, f"{prefix}o"])
            took = time.monotonic() - t0
            verdict = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"== fuzz {name}: {verdict} in {took:.1f} s ==", file=sys.stderr, flush=True)
            if code != 0:
                failed.append(name)
    if failed:
        print(
            f"invariant broken in: {', '.join(failed)}; failing inputs in {artifacts} "
            f"(rerun one with: python -m engine fuzz TARGET --reproduce FILE)",
            file=sys.stderr,
        )
        return 1
    if not args.artifacts:
        shutil.rmtree(artifacts, ignore_errors=True)
    return 0
