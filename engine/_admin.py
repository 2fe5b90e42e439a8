"""The admin API: see and end a user's sessions over HTTP, behind the app's own guard.

``engine.fastapi.admin_router(guard)`` re-exports it; only that module imports this one,
so the core never needs FastAPI. What the Spring Boot actuator's ``sessions`` endpoint
offers (find by principal, delete one), plus "end every session of this user" in one
atomic step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel

from ._engine import SessionEngine
from ._session_info import SessionInfo

__all__ = ["SessionInfo", "admin_router"]


async def _engine_of(request: Request) -> SessionEngine:
    from .fastapi import get_engine  # noqa: PLC0415 - fastapi.py imports this module

    return await get_engine(request)


# Module level: FastAPI resolves the (string) annotations in this module's globals.
Engine = Annotated[SessionEngine, Depends(_engine_of)]


class Revoked(BaseModel):
    """How many live sessions the call ended."""

    revoked: int


def admin_router(
    guard: Callable[..., Any],
    *,
    prefix: str = "/admin/sessions",
    tags: Sequence[str] = ("sessions admin",),
) -> APIRouter:
    """A router to list and revoke a user's sessions; every route depends on ``guard``.

    Routes (``user`` is a query parameter, so any user id works, slashes included):

    * ``GET {prefix}?user=U``: the user's live sessions (``SessionInfo``, oldest deadline
      first): ids, state, creation and deadlines; never a token or the session's data.
    * ``DELETE {prefix}/{session_id}?user=U``: revoke one; ``{"revoked": 1}``, or 404 when
      the user has no such live session.
    * ``DELETE {prefix}?user=U``: revoke all of them atomically; ``{"revoked": n}``.

    Args:
        guard: A FastAPI dependency the application supplies: it raises (401/403) unless
            the caller may administer sessions, e.g. ``SessionAuth().require_user(
            lambda s: s.data.get("role") == "admin")``. Required: there is no open
            default.
        prefix: Where the routes live.
        tags: OpenAPI tags.

    The engine is the app's (``engine_lifespan``); engine errors are answered by
    ``install_error_handlers`` (503 when Redis cannot answer, 422 for a bad user id).
    """
    if not callable(guard):
        raise TypeError("admin_router needs a guard: a dependency that refuses non-admins")
    router = APIRouter(prefix=prefix, tags=list(tags), dependencies=[Depends(guard)])
    user_query = Query(min_length=1, description="the user whose sessions these are")

    @router.get("", response_model=list[SessionInfo])
    async def list_sessions(engine: Engine, user: str = user_query) -> list[SessionInfo]:
        return [SessionInfo.of(s) for s in await engine.list_user_sessions(user)]

    @router.delete("/{session_id}", response_model=Revoked)
    async def revoke_session(session_id: str, engine: Engine, user: str = user_query) -> Revoked:
        if not await engine.revoke_session_id(user, session_id):
            raise HTTPException(404, "the user has no such live session")
        return Revoked(revoked=1)

    @router.delete("", response_model=Revoked)
    async def revoke_all(engine: Engine, user: str = user_query) -> Revoked:
        return Revoked(revoked=await engine.revoke_user(user))

    return router
