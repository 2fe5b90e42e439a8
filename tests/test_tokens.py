"""The token format and parser: never raises, never accepts what it did not issue."""

from __future__ import annotations

import base64
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from engine._tokens import (
    SECRET_LEN,
    TAG_LEN,
    TOKEN_LEN,
    new_token,
    parse_token,
    random_tag,
    session_id_of,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def enc(raw: bytes) -> str:
    """Canonical unpadded base64url."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _canonical(tag: str, secret: str) -> bool:
    """What new_token can produce: tag and secret are canonical unpadded base64url."""
    try:
        raw_tag = base64.urlsafe_b64decode(tag + "==")
        raw = base64.urlsafe_b64decode(secret + "=")
    except ValueError:
        return False
    return len(raw_tag) == 6 and len(raw) == 32 and enc(raw_tag) == tag and enc(raw) == secret


def test_new_token_shape_and_entropy() -> None:
    tokens = {new_token(random_tag()) for _ in range(2000)}
    assert len(tokens) == 2000
    for tok in list(tokens)[:200]:
        assert len(tok) == TOKEN_LEN
        tag, secret = parse_token(tok) or ("", "")
        assert len(tag) == TAG_LEN and len(secret) == SECRET_LEN
        assert len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 bits from secrets
        assert set(tok) <= set(ALPHABET + ".")


def test_session_id_is_a_one_way_digest_of_the_secret() -> None:
    tok = new_token(random_tag())
    _, secret = parse_token(tok) or ("", "")
    sid = session_id_of(secret)
    assert len(sid) == 22 and secret not in sid and sid not in tok
    assert session_id_of(secret) == sid


BAD = [
    "",
    ".",
    "a" * TOKEN_LEN,
    "{abcdefg}." + "A" * 42,
    "abcd:efg." + "A" * 43,
    "abcdefgh." + "A" * 42 + "\r",
    "abcdefgh." + "A" * 41 + "\r\n",
    "abcdefgh." + "A" * 42 + "\x00",
    "abcdefgh." + "A" * 42 + "é",
    "abcdefgh." + "A" * 42 + "B",  # non-canonical last character
    "abcdefgh " + "A" * 43,
    "abcdefgh.." + "A" * 42,
    "x" * 1_000_000,
    None,
    123,
    b"abcdefgh." + b"A" * 43,
]


def test_rejects_malformed_tokens_fast() -> None:
    for bad in BAD:
        assert parse_token(bad) is None, bad
    huge = "x" * 1_000_000
    start = time.perf_counter()
    for _ in range(1000):
        assert parse_token(huge) is None
    # A megabyte token is rejected on its length, not by reading it. The bound is loose on
    # purpose (a shared, noisy machine): reading 1 MB a thousand times would take far longer.
    assert time.perf_counter() - start < 0.05


@settings(max_examples=3000, deadline=None)
@given(st.text(max_size=80) | st.text(alphabet=ALPHABET + ".", min_size=52, max_size=52))
def test_parser_never_raises_and_accepts_only_canonical(text: str) -> None:
    parsed = parse_token(text)
    if parsed is not None:
        tag, secret = parsed
        assert f"{tag}.{secret}" == text
        assert _canonical(tag, secret)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=6, max_size=6), st.binary(min_size=32, max_size=32))
def test_parser_accepts_every_issuable_token(tag_raw: bytes, secret_raw: bytes) -> None:
    token = f"{enc(tag_raw)}.{enc(secret_raw)}"
    assert parse_token(token) == (enc(tag_raw), enc(secret_raw))


@settings(max_examples=2000, deadline=None)
@given(st.from_type(object))
def test_parser_never_raises_on_any_object(value: object) -> None:
    assert parse_token(value) is None or isinstance(value, str)
