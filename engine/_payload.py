"""Session data and chat messages: caller objects to the JSON bytes Redis stores.

Everything is checked here, before any Redis call: what is stored must come back as the
same JSON object (a dict), so a value that does not round-trip is refused rather than
stored changed (orjson and pydantic both write NaN and Infinity as ``null``) or stored
unreadable (a model set to write them as ``NaN``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
from pydantic import BaseModel

from ._errors import InvalidArgument, PayloadTooLarge

__all__ = ["encode_data"]

_MAX_DEPTH = 300  # past orjson's own nesting limit (254): bounds the finiteness walk


def encode_data(data: object, limit: int, what: str) -> bytes:
    """The JSON bytes of ``data`` (a dict or a pydantic model that dumps to an object).

    Raises:
        InvalidArgument: not a dict/model, not a JSON object, not JSON-serialisable, or
            holding a float that is not finite.
        PayloadTooLarge: more than ``limit`` bytes of JSON.
    """
    if data is None:
        return b"{}"
    if isinstance(data, BaseModel):
        try:
            raw = data.model_dump_json().encode()
        except (ValueError, TypeError) as exc:  # pydantic's serialisation errors
            raise InvalidArgument(f"{what} cannot be serialised: {_first_line(exc)}") from exc
        if not raw.startswith(b"{"):
            raise InvalidArgument(f"{what} must serialise to a JSON object")
        try:
            # A model may be configured to write NaN as a bare constant: not JSON.
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"{what} does not serialise to valid JSON") from exc
        check_value: Any = data.model_dump() if b"null" in raw else None
    elif isinstance(data, dict):
        try:
            raw = orjson.dumps(data)
        except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
            raise InvalidArgument(f"{what} is not JSON-serialisable: {exc}") from exc
        check_value = data if b"null" in raw else None
    else:
        raise InvalidArgument(f"{what} must be a dict or a pydantic model")
    if len(raw) > limit:
        raise PayloadTooLarge(f"{what} is {len(raw)} bytes, more than {limit}")
    # A non-finite float becomes null on the way out: only a payload with a null can hold
    # one, so most payloads skip the walk.
    if check_value is not None and not _all_finite(check_value, 0):
        raise InvalidArgument(f"{what} holds NaN or Infinity, which JSON cannot carry")
    return raw


def _all_finite(value: Any, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        raise InvalidArgument("data is nested too deeply")
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return all(_all_finite(v, depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(
            _all_finite(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)
        )
    if isinstance(value, BaseModel):
        return _all_finite(value.model_dump(), depth + 1)
    return True


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
