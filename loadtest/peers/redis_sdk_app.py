"""fastapi-redis-sdk 0.9 (module ``redis_fastapi``) server-side sessions, as its README shows.

``FastAPIRedis(app).lifespan().sessions()``, ``SessionDep`` and
``Depends(valid_session())``. Settings come from ``REDIS_*`` variables (``REDIS_URL``,
``REDIS_CLUSTER=true`` for an OSS cluster, ``REDIS_PREFIX``). Needs Redis >= 7.4 (HGETEX
from 8.0 when the server has it).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from redis_fastapi import FastAPIRedis, SessionDep, valid_session

app = FastAPI()
FastAPIRedis(app).lifespan().sessions()


class Login(BaseModel):
    user_id: str


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return {"ok": True}


@app.post("/login")
async def login(body: Login, session: SessionDep) -> dict[str, Any]:
    session["user_id"] = body.user_id  # rotates the session id after the endpoint
    return {"ok": True}


@app.get("/me", dependencies=[Depends(valid_session())])
async def me(session: SessionDep) -> dict[str, Any]:
    return {"user": session.get("user_id")}
