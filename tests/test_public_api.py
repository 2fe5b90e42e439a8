"""The public surface is exactly ``engine.__all__``; everything else is private."""

from __future__ import annotations

import engine
from engine import (
    ChatRoomLimitExceeded,
    EngineError,
    EngineUnavailable,
    InvalidArgument,
    LimitExceeded,
    OutcomeUnknown,
    PayloadTooLarge,
    ReplicationIncomplete,
    SessionConflict,
    SessionLimitExceeded,
    SessionNotFound,
)

EXPECTED = {
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
}


def test_all_is_exactly_the_contract() -> None:
    assert set(engine.__all__) == EXPECTED
    assert sorted(engine.__all__) == engine.__all__


def test_every_public_name_is_defined_and_documented() -> None:
    for name in engine.__all__:
        obj = getattr(engine, name)
        assert obj.__doc__, f"{name} has no docstring"
        assert obj.__module__.startswith("engine._"), name


def test_no_private_module_leaks_a_public_name() -> None:
    # "@py_builtins" and the like: pytest rewrites the asserts of a plugin's package (ours
    # is registered as one) and leaves these names behind; they are not ours.
    public = {n for n in dir(engine) if not n.startswith(("_", "@"))}
    modules = {
        "cli",
        "cluster",
        "fastapi",
        "metrics",
        "testing",
    }  # subpackages users import themselves
    assert public - set(engine.__all__) - modules <= {"annotations"}


def test_one_error_tree() -> None:
    for err in (
        EngineUnavailable,
        InvalidArgument,
        PayloadTooLarge,
        ReplicationIncomplete,
        SessionConflict,
        SessionLimitExceeded,
        SessionNotFound,
    ):
        assert issubclass(err, EngineError)
    assert issubclass(PayloadTooLarge, InvalidArgument)
    assert issubclass(OutcomeUnknown, EngineUnavailable)
    assert issubclass(SessionLimitExceeded, LimitExceeded)
    assert issubclass(ChatRoomLimitExceeded, LimitExceeded)
    assert issubclass(LimitExceeded, EngineError)
