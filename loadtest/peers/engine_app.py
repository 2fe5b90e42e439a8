"""This engine, wired as its README shows: ``engine_lifespan`` + ``require_session``.

``ENGINE_URL`` (a cluster node) and ``ENGINE_KEY_PREFIX`` come from the environment; nothing
is cached in the process unless ``ENGINE_LOCAL_CACHE_SIZE`` says so. ``freeze_gc=True``
as the README recommends for latency-critical services, where the engine under test has
it (an older checkout measured with ``--engine-old`` may not).

``ENGINE_ME_DIRECT=1``: ``/me`` takes the request and calls ``require_session(request)``
itself instead of declaring ``Depends(require_session)`` (README, "The fastest endpoint"):
the same answers without FastAPI's dependency machinery.
"""

from __future__ import annotations

import inspect
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel

from engine import Session, SessionEngine
from engine.fastapi import engine_lifespan, get_engine, require_session, set_session_cookie

_FREEZE = (
    {"freeze_gc": True} if "freeze_gc" in inspect.signature(engine_lifespan).parameters else {}
)
app = FastAPI(lifespan=engine_lifespan(**_FREEZE))


class Login(BaseModel):
    user_id: str


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return {"ok": True}


@app.post("/login")
async def login(
    body: Login, engine: Annotated[SessionEngine, Depends(get_engine)], response: Response
) -> dict[str, Any]:
    new = await engine.create(user_id=body.user_id)
    set_session_cookie(response, new.token)  # production defaults (Secure, HttpOnly)
    return {"ok": True}


if os.environ.get("ENGINE_ME_DIRECT") == "1":

    @app.get("/me")
    async def me_direct(request: Request) -> dict[str, Any]:
        session = await require_session(request)
        return {"user": session.user_id}

else:

    @app.get("/me")
    async def me(session: Annotated[Session, Depends(require_session)]) -> dict[str, Any]:
        return {"user": session.user_id}
