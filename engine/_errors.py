"""The one error tree of the engine.

Every error the engine raises on purpose is an ``EngineError``::

    EngineError
    ├── EngineUnavailable        Redis did not answer in time, a node is down, the cluster
    │   │                        is failing over: the answer is unknown, so fail closed
    │   │                        (a web service turns this into 503, never into "valid").
    │   └── OutcomeUnknown       a write was sent and its reply lost: it may or may not
    │                            have been applied, and it was not sent again (a resend
    │                            could undo a later delete)
    ├── InvalidArgument          a user id, room id, TTL or token argument the engine refuses
    │   └── PayloadTooLarge      session data or a chat message over its configured size
    ├── SessionNotFound          the session is gone (expired, revoked, never existed)
    ├── SessionConflict          compare-and-set on ``version`` lost the race
    ├── PermissionDenied         the Redis ACL user lacks a command, key or channel the
    │                            engine needs (NOPERM); ``python -m engine acl`` prints
    │                            the rule that grants exactly what it needs
    ├── LimitExceeded            a per-user bound of the settings would be passed
    │   ├── SessionLimitExceeded the user has ``max_sessions_per_user`` live sessions and
    │   │                        the limit policy is ``refuse``
    │   └── ChatRoomLimitExceeded
    │                            the user has ``chat_max_rooms_per_user`` chat rooms
    ├── ReplicationIncomplete    ``wait_replicas`` is set and fewer replicas than asked
    │                            acknowledged a write within ``wait_timeout`` (the write
    │                            itself happened on the primary)
    └── EventsUnavailable        ``events()`` cannot work: a primary's
                                 ``notify-keyspace-events`` lacks flags it needs (named
                                 in the message), or cannot be read

Errors of the library below (redis-py, sockets, hiredis) are mapped to this tree in one
place, ``map_reply_error`` and the transport, always with ``raise ... from``.
"""

from __future__ import annotations

import re

__all__ = [
    "ChatRoomLimitExceeded",
    "EngineError",
    "EngineUnavailable",
    "EventsUnavailable",
    "InvalidArgument",
    "LimitExceeded",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PermissionDenied",
    "ReplicationIncomplete",
    "SessionConflict",
    "SessionLimitExceeded",
    "SessionNotFound",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class EngineUnavailable(EngineError):
    """Redis could not give an answer within the call's deadline.

    The outcome of a write that raised this is unknown; a read that raised it checked
    nothing. Callers must fail closed.
    """


class OutcomeUnknown(EngineUnavailable):
    """A write was sent, and the connection was lost before its reply came.

    The write may or may not have been applied. The engine does not send it again: a
    resend could re-apply it after a later delete (a create brought back after a
    ``revoke_user``). A ``create`` that raised this may have left a session whose token
    nobody holds; it idles out like any other.
    """


class InvalidArgument(EngineError, ValueError):
    """An argument the engine refuses before any Redis call."""


class PayloadTooLarge(InvalidArgument):
    """Session data or a chat message is larger than its configured limit."""


class SessionNotFound(EngineError, LookupError):
    """The session does not exist any more (or never did)."""


class SessionConflict(EngineError):
    """``expected_version`` did not match the stored version."""

    def __init__(self, message: str, *, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version


class PermissionDenied(EngineError):
    """The Redis ACL user may not run a command (or touch a key or channel) the engine needs.

    A deployment error, not an outage: retrying does not help, the ACL rule must grant it
    (``python -m engine acl --prefix P --features ...`` prints that rule).

    Attributes:
        permission: What is missing, as Redis or the script source names it (``'evalsha'``,
            ``'time'``, ``'keys'``), or ``None`` when the reply did not say.
    """

    def __init__(self, message: str, *, permission: str | None = None) -> None:
        super().__init__(message)
        self.permission = permission


class LimitExceeded(EngineError):
    """A per-user bound of the settings would be passed; nothing was written."""


class SessionLimitExceeded(LimitExceeded):
    """The user already has the maximum number of sessions and the policy refuses more."""


class ChatRoomLimitExceeded(LimitExceeded):
    """The user already has ``chat_max_rooms_per_user`` chat rooms; a new one is refused."""


class ReplyError(Exception):
    """An error reply from Redis, as parsed by hiredis. Internal: carried as a value by the
    transport, never raised to callers (``map_reply_error`` turns it into an EngineError)."""


_UNAVAILABLE = frozenset(
    (
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "LOADING",
        "BUSY",
        "UNBLOCKED",
        "MOVED",
        "ASK",
        "NOSCRIPT",
    )
)


def reply_kind(reply: ReplyError) -> str:
    """An error reply's kind: its first word (MOVED, ASK, TRYAGAIN, NOSCRIPT, ERR, ...).

    One rename: a script that touches a key whose slot is migrating and which has moved
    already gets "ERR Script attempted to access a non local key". That means what
    TRYAGAIN means (the slot is on its way; ask again shortly), so it is TRYAGAIN here and
    every user of the kind (retries, error mapping) treats it alike.
    """
    message = str(reply)
    if "non local key" in message:
        return "TRYAGAIN"
    return message.split(" ", 1)[0]


_NOPERM_NAMED = re.compile(r"permissions to (?:run|access) the '([^']+)'")
# Redis 7.0 does not name the command a script was refused; it names the script's SHA1 and
# line, from which the script source tells the command.
_SCRIPT_DENIED = re.compile(r"script: ([0-9a-f]{40}), on @user_script:(\d+)")


def permission_denied(reply: ReplyError, *, operation: str) -> PermissionDenied | None:
    """``PermissionDenied`` naming what is missing if ``reply`` is an ACL refusal, else None.

    Covers NOPERM replies to a command (``... to run the 'evalsha' command``, keys,
    channels) and refusals inside a script (``ERR The user executing the script can't
    ...``), where the command is read from the script's source line.
    """
    message = str(reply)
    permission: str | None = None
    if message.startswith("NOPERM"):
        named = _NOPERM_NAMED.search(message)
        permission = named.group(1) if named else ("keys" if "keys" in message else None)
    elif message.startswith("ERR The user executing the script can't"):
        from ._acl import denied_script_command  # noqa: PLC0415 - _acl imports the scripts

        where = _SCRIPT_DENIED.search(message)
        if "access" in message:
            permission = "keys"
        elif where is not None:
            permission = denied_script_command(where.group(1), int(where.group(2)))
    else:
        return None
    what = f"{permission!r}" if permission else "a permission"
    return PermissionDenied(
        f"{operation}: the Redis user lacks {what} (`python -m engine acl` prints the rule "
        f"the engine needs): {message}",
        permission=permission,
    )


def map_reply_error(reply: ReplyError, *, operation: str) -> EngineError:
    """The one place where a Redis error reply becomes an engine error."""
    denied = permission_denied(reply, operation=operation)
    if denied is not None:
        return denied
    message = str(reply)
    if reply_kind(reply) in _UNAVAILABLE:
        # The server could not do it now (or the deadline ran out mid-redirect): the
        # answer is unknown, fail closed.
        return EngineUnavailable(f"{operation}: {message}")
    return EngineError(f"{operation}: unexpected Redis error: {message}")


class ReplicationIncomplete(EngineError):
    """Fewer replicas than ``wait_replicas`` acknowledged a write in time.

    The write is applied on the primary; it may be lost if that primary fails now.
    ``result`` holds what the call would have returned (the ``NewSession`` of a create or
    rotate, whose token is the only copy; the bool of a revoke; the count of a
    revoke_user), so the caller can still use it or undo it.
    """

    def __init__(
        self, message: str, *, acknowledged: int, wanted: int, result: object = None
    ) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged
        self.wanted = wanted
        self.result = result


class EventsUnavailable(EngineError):
    """``SessionEngine.events()`` cannot deliver events from a primary.

    Its ``notify-keyspace-events`` lacks flags the events need (the message names the
    node, the missing flags and the ``CONFIG SET`` that adds them), or the setting cannot
    be read (a managed Redis that renames CONFIG: pass ``check=False`` after setting it
    through the provider's own parameter groups).
    """
