"""starsessions 2.2 with its Redis store, wired as its README shows.

``SessionMiddleware`` with ``RedisStore(connection=...)`` (the ``url=`` form is deprecated),
``load_session(request)`` where the session is used, a rolling 30-minute lifetime (the
idle timeout the other systems have). RedisStore has no cluster support: it runs against one
plain ``redis-server`` at ``HTTPBENCH_REDIS_URL``; keys start with ``HTTPBENCH_PREFIX``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.middleware import Middleware
from starsessions import SessionMiddleware, load_session
from starsessions.stores.redis import RedisStore

redis = Redis.from_url(os.environ.get("HTTPBENCH_REDIS_URL", "redis://127.0.0.1:6379"))
store = RedisStore(connection=redis, prefix=os.environ.get("HTTPBENCH_PREFIX", "starsessions."))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await redis.aclose()


app = FastAPI(
    lifespan=lifespan,
    middleware=[
        Middleware(
            SessionMiddleware,
            store=store,
            lifetime=1800,
            rolling=True,
        )
    ],
)


class Login(BaseModel):
    user_id: str


async def current_user(request: Request) -> str:
    await load_session(request)
    user = request.session.get("user_id")
    if not user:
        raise HTTPException(401, "not authenticated")
    return str(user)


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return {"ok": True}


@app.post("/login")
async def login(body: Login, request: Request) -> dict[str, Any]:
    await load_session(request)
    request.session["user_id"] = body.user_id
    return {"ok": True}


@app.get("/me")
async def me(user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
    return {"user": user}
