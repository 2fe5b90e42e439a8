"""``SessionInfo``: what an administrator sees of a session (admin API and CLI)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from ._models import Session, SessionState

__all__ = ["SessionInfo"]


class SessionInfo(BaseModel):
    """What the admin API shows of a session: never its token, nor its data (which may
    hold anything the application stored).

    Attributes:
        session_id: The public id (what ``revoke`` takes).
        user_id: The owner.
        state: ``active``, ``pending`` or ``locked``.
        created_at: Creation time (server clock, UTC).
        idle_expires_at: When it dies if not used again.
        absolute_expires_at: When it dies whatever happens.
        version: How many updates it has had (+1).
    """

    model_config = ConfigDict(frozen=True)

    session_id: str
    user_id: str | None
    state: SessionState
    created_at: datetime
    idle_expires_at: datetime
    absolute_expires_at: datetime
    version: int

    @classmethod
    def of(cls, session: Session) -> SessionInfo:
        return cls(
            session_id=session.session_id,
            user_id=session.user_id,
            state=session.state,
            created_at=session.created_at,
            idle_expires_at=session.expires_at,
            absolute_expires_at=session.absolute_expires_at,
            version=session.version,
        )
