"""Token format: ``<tag>.<secret>``, generation and a parser that never raises.

* ``tag``: 8 base64url characters (6 bytes), the routing tag. Every key of the session
  carries it as its Redis Cluster hash tag, so the token alone tells which slot to ask.
* ``secret``: 43 base64url characters, the canonical unpadded encoding of 32 bytes from
  ``secrets.token_bytes``.

Redis never sees the secret: keys carry ``session_id``, a truncated SHA-256 of it.
The parser accepts only what ``new_token`` can produce (right length, alphabet, separator,
canonical last character), so braces, ':', CRLF, NUL, non-ASCII and huge inputs are
rejected before anything else happens, in well under a microsecond per byte of the
legal length (the length is checked first).
"""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = [
    "SECRET_LEN",
    "TAG_LEN",
    "TOKEN_LEN",
    "new_secret",
    "new_token",
    "parse_token",
    "random_tag",
    "session_id_of",
]

TAG_BYTES = 6
TAG_LEN = 8
SECRET_BYTES = 32
SECRET_LEN = 43
TOKEN_LEN = TAG_LEN + 1 + SECRET_LEN
SESSION_ID_BYTES = 16  # 128 bits of the digest: public id and key suffix

_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# 43 characters carry 258 bits for 256: the last character's two low bits must be zero in
# the canonical encoding, so only every fourth letter of the alphabet may end a secret.
_B64URL_ORDER = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CANONICAL_LAST = frozenset(_B64URL_ORDER[i] for i in range(0, 64, 4))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def random_tag() -> str:
    """A random routing tag, for anonymous sessions (spreads them over all slots)."""
    return _b64(secrets.token_bytes(TAG_BYTES))


def new_secret() -> str:
    """A fresh 256-bit secret in canonical unpadded base64url."""
    return _b64(secrets.token_bytes(SECRET_BYTES))


def new_token(tag: str) -> str:
    """A new token for the given routing tag."""
    return f"{tag}.{new_secret()}"


def session_id_of(secret: str) -> str:
    """The public session id: base64url of the first 128 bits of SHA-256(secret)."""
    digest = hashlib.sha256(secret.encode("ascii")).digest()
    return _b64(digest[:SESSION_ID_BYTES])


def parse_token(token: object) -> tuple[str, str] | None:
    """Split a token into ``(tag, secret)``, or ``None`` if it is not one we could have issued.

    Never raises, whatever it is given.
    """
    if type(token) is not str or len(token) != TOKEN_LEN or token[TAG_LEN] != ".":
        return None
    tag = token[:TAG_LEN]
    secret = token[TAG_LEN + 1 :]
    if secret[-1] not in _CANONICAL_LAST:
        return None
    if not _B64URL.issuperset(tag) or not _B64URL.issuperset(secret):
        return None
    return tag, secret
