"""The contract every target checks: sources of choices, reference verdicts, ``expect``."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson
from pydantic import BaseModel

from ..._errors import (
    EngineError,
    InvalidArgument,
    PayloadTooLarge,
    SessionNotFound,
)
from ..._settings import MAX_TTL

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
    """One of ``options``, chosen by the source."""
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


def unexpected(exc: BaseException) -> bool:
    """Not an error the engine documents."""
    return not isinstance(exc, EngineError)


def reached_io(exc: BaseException) -> bool:
    """An unopened engine's answer to a call that passed every argument check."""
    return isinstance(exc, EngineError) and not isinstance(exc, InvalidArgument | SessionNotFound)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


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
    return len(raw_tag) == 6 and len(raw) == 32 and b64(raw_tag) == tag and b64(raw) == secret


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
    if isinstance(value, list | tuple):
        inner = all_kinds(_json_kind(v, depth + 1) for v in value)
        # orjson writes list subclasses but not tuple ones (named tuples): either way
        return inner if type(value) in (list, tuple) or inner is False else None
    if isinstance(value, dict):
        kinds = [_json_kind(v, depth + 1) for v in value.values()]
        for key in value:
            if type(key) is not str:
                kinds.append(None if isinstance(key, str) else False)
            else:
                kinds.append(_json_kind(key, depth + 1))
        return all_kinds(kinds)
    if isinstance(value, str | int | float | datetime):  # orjson writes these too
        return None
    return False


def all_kinds(kinds: Iterable[bool | None]) -> bool | None:
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
    error: BaseException | None,
    *,
    too_large: bool = False,
    secrets: Sequence[object] = (),
    live: bool = False,
    **inputs: Any,
) -> bool:
    """Hold a call's error (``None``: it returned normally) to a verdict; True when accepted.

    Refusals must be ``InvalidArgument`` (``PayloadTooLarge`` when only the size is wrong);
    anything not an ``EngineError`` breaks the invariant whatever the verdict. ``live``:
    the engine is open, so an accepted call must return normally (otherwise it must get
    as far as I/O, which an engine that is not open refuses with a plain EngineError).
    """
    if error is not None:
        if unexpected(error):
            raise broken(target, f"{what} raised {show(error)}", **inputs) from error
        if (secret := leaked(error, secrets)) is not None:
            raise broken(target, f"{what}: a secret is in the error text", secret=secret, **inputs)
    refused = isinstance(error, InvalidArgument)
    if ok is True and refused:
        raise broken(target, f"{what} refused valid arguments: {show(error)}", **inputs)
    if ok is False and not refused:
        answer = "accepted them" if error is None else f"raised {show(error)}"
        raise broken(target, f"{what} {answer} instead of refusing", **inputs)
    if ok is False and too_large and not isinstance(error, PayloadTooLarge):
        raise broken(target, f"{what} raised {show(error)}, not PayloadTooLarge", **inputs)
    if error is not None and not refused and (live or not reached_io(error)):
        raise broken(target, f"{what}: unexpected {show(error)}", **inputs)
    return not refused


async def outcome(call: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    """``(result, None)`` or ``(None, error)``: every exception is data to be judged."""
    try:
        return await call, None
    except Exception as exc:
        return None, exc
