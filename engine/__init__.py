"""A fast, fail-closed session engine for Python services on Redis Cluster.

Everything public is re-exported here; the ``_modules`` behind it are private.
"""

from ._engine import SessionEngine
from ._errors import (
    ChatRoomLimitExceeded,
    EngineError,
    EngineUnavailable,
    EventsUnavailable,
    InvalidArgument,
    LimitExceeded,
    OutcomeUnknown,
    PayloadTooLarge,
    PermissionDenied,
    ReplicationIncomplete,
    SessionConflict,
    SessionLimitExceeded,
    SessionNotFound,
)
from ._events import SessionEvent, SessionEventKind, SessionEventStream
from ._models import EngineStats, MissReasons, NewSession, Session, SessionState
from ._run import install_uvloop, run
from ._settings import EngineSettings

__all__ = [
    "ChatRoomLimitExceeded",
    "EngineError",
    "EngineSettings",
    "EngineStats",
    "EngineUnavailable",
    "EventsUnavailable",
    "InvalidArgument",
    "LimitExceeded",
    "MissReasons",
    "NewSession",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PermissionDenied",
    "ReplicationIncomplete",
    "Session",
    "SessionConflict",
    "SessionEngine",
    "SessionEvent",
    "SessionEventKind",
    "SessionEventStream",
    "SessionLimitExceeded",
    "SessionNotFound",
    "SessionState",
    "install_uvloop",
    "run",
]

__version__ = "0.1.0"
