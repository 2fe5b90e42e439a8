"""Key layout. All keys of one user share a hash slot through the ``{tag}`` hash tag.

::

    <prefix>:{<tag>}:s:<session_id>          session hash
    <prefix>:{<tag>}:u:<user>                the user's session index (sorted set by deadline)
    <prefix>:{<tag>}:r:<user>                the user's chat rooms (set), for revoke_user
    <prefix>:{<tag>}:c:<user>:<room>         one chat history (list)

``<user>`` and ``<room>`` are percent-encoded with no safe characters beyond RFC 3986's
unreserved set, so ':', '{', '}', '%', spaces, CRLF or NUL in an id can never change a key's
structure or its slot, and two different (user, room) pairs never share a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import quote

from ._errors import InvalidArgument
from ._tokens import TAG_BYTES

__all__ = ["KeySpace", "key_slot", "slot_of_tag"]

SLOTS = 16384


def slot_of_tag(tag: str | bytes) -> int:
    """Redis Cluster slot of a hash tag's content (CRC16-XMODEM, which is ``crc_hqx``)."""
    raw = tag.encode() if isinstance(tag, str) else tag
    return binascii.crc_hqx(raw, 0) & (SLOTS - 1)


def key_slot(key: str | bytes) -> int:
    """Redis Cluster slot of a whole key, honouring the ``{...}`` hash tag rule."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) & (SLOTS - 1)


class KeySpace:
    """Builds every key name from a prefix; the only place that knows the layout."""

    __slots__ = ("_max_id_bytes", "_prefix", "_session_head", "_tag_key")

    def __init__(self, prefix: str, *, tag_secret: bytes | None, max_id_bytes: int) -> None:
        if "{" in prefix or "}" in prefix:
            raise InvalidArgument("key_prefix must not contain braces")
        self._prefix = prefix
        self._session_head = f"{prefix}:{{".encode()
        self._tag_key = tag_secret
        self._max_id_bytes = max_id_bytes

    def base(self, tag: str) -> str:
        """``<prefix>:{<tag>}:``, the common head of every key with that tag."""
        return f"{self._prefix}:{{{tag}}}:"

    def session(self, tag: str, session_id: str) -> str:
        return f"{self._prefix}:{{{tag}}}:s:{session_id}"

    def user_tag(self, user_id: str) -> str:
        """The routing tag of a user: a (keyed) hash of the id, so it is stable and short."""
        raw = user_id.encode("utf-8")
        if self._tag_key is None:
            digest = hashlib.sha256(b"engine-tag\x00" + raw).digest()
        else:
            digest = hmac.new(self._tag_key, raw, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:TAG_BYTES]).decode("ascii")

    def check_id(self, value: object, what: str) -> str:
        """Validate a user or room id: a non-empty str of at most ``max_id_bytes`` bytes."""
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} must be a str, not {type(value).__name__}")
        if not value:
            raise InvalidArgument(f"{what} must not be empty")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{what} is not encodable as UTF-8") from exc
        if size > self._max_id_bytes:
            raise InvalidArgument(f"{what} is {size} bytes, more than {self._max_id_bytes}")
        return value

    @staticmethod
    def encode_id(value: str) -> str:
        return quote(value, safe="")

    def user_index(self, tag: str, user_id: str) -> str:
        return f"{self._prefix}:{{{tag}}}:u:{self.encode_id(user_id)}"

    def user_rooms(self, tag: str, user_id: str) -> str:
        return f"{self._prefix}:{{{tag}}}:r:{self.encode_id(user_id)}"

    def chat(self, tag: str, user_id: str, room_id: str) -> str:
        return f"{self._prefix}:{{{tag}}}:c:{self.encode_id(user_id)}:{self.encode_id(room_id)}"

    def is_session_key(self, key: bytes) -> bool:
        """Whether a key name (as Redis returns it) is one of this prefix's sessions."""
        return key.startswith(self._session_head) and b"}:s:" in key

    def session_pattern(self) -> str:
        """A glob matching every session key under this prefix (for counting, not for use)."""
        return f"{self._prefix}:{{*}}:s:*"
