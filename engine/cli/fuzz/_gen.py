"""Generators: fuzzer choices (a ``Source``) turned into the arguments of public entries."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from ..._models import SessionState
from ..._settings import MAX_TTL, EngineSettings
from ._core import ALPHABET, MAX_ID_BYTES, PASSWORD, TOKEN_LEN, Source, b64, pick


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


def canonical_token(src: Source) -> str:
    tag = b64((src.raw(6) + bytes(6))[:6])
    secret = b64((src.raw(32) + bytes(32))[:32])
    return f"{tag}.{secret}"


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


SETTING_FIELDS: Final = tuple(EngineSettings.model_fields)
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
