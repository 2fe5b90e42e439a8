"""Public data models: what the engine hands back to its callers."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EngineStats",
    "MissReasons",
    "NewSession",
    "Session",
    "SessionState",
    "build_session",
]


class SessionState(enum.StrEnum):
    """Where a session is in its life. ``validate`` accepts ``ACTIVE`` unless told otherwise."""

    ACTIVE = "active"
    """The normal, fully authenticated state."""
    PENDING = "pending"
    """Authenticated in part, e.g. a second factor is outstanding."""
    LOCKED = "locked"
    """Kept for inspection but refused everywhere, e.g. under fraud review."""


class Session(BaseModel):
    """A live session as stored in Redis. Never contains the token.

    Attributes:
        session_id: Public id derived from the token's secret by a one-way hash; safe to log,
            show in a "your devices" list and pass to ``revoke_session_id``.
        user_id: The owner, or ``None`` for an anonymous session.
        state: See ``SessionState``.
        data: The caller's JSON payload.
        created_at: Creation time (server clock, UTC).
        expires_at: When the session dies if not used again (idle deadline).
        absolute_expires_at: When it dies whatever happens.
        version: Incremented by every ``update``; use it for compare-and-set.
    """

    model_config = ConfigDict(frozen=True)

    session_id: str
    user_id: str | None
    state: SessionState
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime
    absolute_expires_at: datetime
    version: int


_SESSION_FIELDS = frozenset(Session.model_fields)
_new = object.__new__
_set = object.__setattr__


def build_session(values: dict[str, Any]) -> Session:
    """A ``Session`` from values the engine produced itself, skipping validation.

    The hot path builds one per validation; pydantic's ``model_construct`` costs several
    times more than this. Only for trusted, complete, correctly typed values (a test checks
    the result equals a validated ``Session``).
    """
    obj = _new(Session)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", _SESSION_FIELDS)
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


class NewSession(BaseModel):
    """What ``create`` and ``rotate`` return: the token (give it to the client) and the session.

    Attributes:
        token: The bearer token. It is the only copy: Redis keeps only a digest.
        session: The stored session.
        replicas_acknowledged: With ``wait_replicas`` set, how many replicas acknowledged
            the write; ``None`` when no WAIT was sent.
    """

    model_config = ConfigDict(frozen=True)

    token: str = Field(repr=False)
    session: Session
    replicas_acknowledged: int | None = None


class MissReasons(BaseModel):
    """Counts of validations that returned ``None``, by why."""

    model_config = ConfigDict(frozen=True)

    unknown: int = 0
    expired: int = 0
    state: int = 0
    malformed: int = 0


class EngineStats(BaseModel):
    """A snapshot of the engine's counters and of the cluster's size.

    Attributes:
        validations: ``validate`` and ``validate_many`` tokens checked by this engine.
        hits: Validations that returned a session.
        misses: Validations that returned ``None``, by reason.
        hit_rate: hits / validations (0.0 before the first validation).
        errors: Calls that raised ``EngineUnavailable``.
        latency_p50_ms: Median ``validate`` latency over the last ``latency_window`` calls.
        latency_p99_ms: 99th percentile of the same.
        active_sessions: Estimate of live sessions in the whole cluster (exact on small
            keyspaces, sampled on large ones).
        used_memory_bytes: ``used_memory`` per primary, keyed by "host:port".
        primaries: Number of primaries the engine routes to.
        mode: ``"cluster"`` or ``"standalone"``.
        local_hits: Validations answered by the local cache (0 when it is off).
        local_misses: Validations the local cache sent to Redis.
        local_invalidations: Keys the servers said changed (invalidation messages).
        local_entries: Sessions in the local cache now.
        local_drops: Entries dropped, by reason (invalidated, write, evicted, expired,
            moved, connection, flush, silent, cluster_down, closed).
    """

    model_config = ConfigDict(frozen=True)

    validations: int
    hits: int
    misses: MissReasons
    hit_rate: float
    errors: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    active_sessions: int
    used_memory_bytes: dict[str, int]
    primaries: int
    mode: str
    local_hits: int = 0
    local_misses: int = 0
    local_invalidations: int = 0
    local_entries: int = 0
    local_drops: dict[str, int] = Field(default_factory=dict)
