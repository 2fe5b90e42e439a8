"""FastAPI integration: an engine per app, and dependencies that authenticate requests.

Only this module imports FastAPI; the core engine does not need it
(``pip install 'redis-session-engine[fastapi]'``).

What it gives you:

* ``engine_lifespan(settings)``: a ``lifespan=`` for ``FastAPI`` that opens one
  ``SessionEngine`` at startup, keeps it on ``app.state.session_engine`` and closes it at
  shutdown; ``get_engine`` is the dependency that hands it to endpoints.
* ``require_session``: the token from ``Authorization: Bearer <token>`` (first) or from the
  session cookie, validated in one round trip; the live ``Session`` or an error response:

  ======================================  ==============================================
  no token                                401, ``WWW-Authenticate: Bearer realm="..."``
  a token that is not a live ACTIVE       401, ``WWW-Authenticate: Bearer realm="...",
  session (garbage, expired, revoked,     error="invalid_token"``
  another state)
  Redis did not answer in time            503, ``Retry-After: 1``: fail closed, never 200
  ======================================  ==============================================

* ``optional_session``: the same, but ``None`` instead of 401 (still 503 when unavailable).
* ``require_state(*states)``: a live session in one of ``states`` (e.g. ``PENDING`` while a
  second factor is outstanding). A session that exists in another state gets 403 (it is
  authenticated, just not allowed here); the state check costs a second read only on that
  failure path.
* ``require_user(user_id | predicate)``: an ACTIVE session whose owner is ``user_id``, or
  for which ``predicate(session)`` is true; otherwise 403.
* ``current_token``: the raw token of the request (for logout and rotate endpoints); 401
  when there is none. It does not validate: pair it with ``require_session``.
* ``set_session_cookie`` / ``clear_session_cookie``: ``HttpOnly; Secure; SameSite=Lax``
  by default.

The module-level dependencies use ``SessionAuth()`` defaults (cookie ``session``, realm
``api``). For other names build your own ``SessionAuth`` and use its attributes, which are
the same dependencies: ``auth = SessionAuth(cookie_name="sid"); Depends(auth.require_session)``.
Within one request FastAPI runs a dependency once, so ``require_session`` and
``require_user`` together still validate once.

Example (a complete app; run ``ENGINE_URL=redis://127.0.0.1:7000 uvicorn example:app``)::

    from typing import Annotated

    from fastapi import Depends, FastAPI, Response
    from pydantic import BaseModel

    from engine import Session, SessionEngine
    from engine.fastapi import (
        clear_session_cookie,
        current_token,
        engine_lifespan,
        get_engine,
        require_session,
        set_session_cookie,
    )

    app = FastAPI(lifespan=engine_lifespan())  # settings from ENGINE_* variables
    Engine = Annotated[SessionEngine, Depends(get_engine)]


    class Login(BaseModel):
        user_id: str


    @app.post("/login")
    async def login(body: Login, engine: Engine, response: Response) -> dict[str, str]:
        new = await engine.create(user_id=body.user_id)  # check a password first!
        set_session_cookie(response, new.token)
        return {"token": new.token}


    @app.get("/me")
    async def me(session: Annotated[Session, Depends(require_session)]) -> Session:
        return session


    @app.post("/logout", status_code=204)
    async def logout(
        engine: Engine,
        token: Annotated[str, Depends(current_token)],
        response: Response,
    ) -> None:
        await engine.revoke(token)
        clear_session_cookie(response)
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations at
# runtime, and the closures below refer to local names a string annotation cannot resolve.

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Final, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from ._engine import SessionEngine
from ._errors import EngineUnavailable
from ._models import Session, SessionState
from ._settings import EngineSettings

__all__ = [
    "STATE_ATTRIBUTE",
    "SessionAuth",
    "clear_session_cookie",
    "current_token",
    "default_auth",
    "engine_lifespan",
    "get_engine",
    "optional_session",
    "require_session",
    "require_state",
    "require_user",
    "set_session_cookie",
]

STATE_ATTRIBUTE: Final = "session_engine"
"""The ``app.state`` attribute that holds the engine."""

DEFAULT_COOKIE: Final = "session"
SameSite = Literal["lax", "strict", "none"]


def engine_lifespan(
    settings: EngineSettings | None = None,
    *,
    engine: SessionEngine | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that opens a ``SessionEngine`` for the app's lifetime.

    The engine is opened before the app takes requests (a cluster that cannot be reached
    fails the startup) and closed after the last one. Building the lifespan does no I/O,
    so a module-level ``app = FastAPI(lifespan=engine_lifespan())`` is import-safe.

    To combine it with a lifespan of your own, enter it from yours::

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with engine_lifespan(settings)(app):
                yield  # plus your own setup and teardown

    Args:
        settings: Engine settings; ``EngineSettings()`` (read from ``ENGINE_*`` variables
            at startup, not at import) when omitted.
        engine: An engine you built yourself (not yet opened) instead of ``settings``.

    Returns:
        A callable to pass as ``FastAPI(lifespan=...)``.
    """
    if settings is not None and engine is not None:
        raise ValueError("pass settings or engine, not both")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine if engine is not None else SessionEngine(settings or EngineSettings())
        async with eng:
            setattr(app.state, STATE_ATTRIBUTE, eng)
            try:
                yield
            finally:
                # Late requests get a clear "no engine" error, not a closed engine.
                delattr(app.state, STATE_ATTRIBUTE)

    return lifespan


def get_engine(request: Request) -> SessionEngine:
    """Dependency: the app's open ``SessionEngine`` (see ``engine_lifespan``).

    Raises:
        RuntimeError: The app has no engine: ``engine_lifespan`` is not its lifespan (or
            the lifespan did not run, as with a bare ``httpx.ASGITransport``).
    """
    eng: SessionEngine | None = getattr(request.app.state, STATE_ATTRIBUTE, None)
    if eng is None:
        raise RuntimeError(
            "no SessionEngine on app.state: create the app with "
            "FastAPI(lifespan=engine_lifespan(...))"
        )
    return eng


def set_session_cookie(
    response: Response,
    token: str,
    *,
    max_age: int | None = None,
    secure: bool = True,
    samesite: SameSite = "lax",
    path: str = "/",
    domain: str | None = None,
    name: str = DEFAULT_COOKIE,
) -> None:
    """Put the session token in a cookie: ``HttpOnly; Secure; SameSite=Lax`` by default.

    Args:
        response: The response (an endpoint's injected ``Response`` works).
        token: The session token.
        max_age: Seconds; ``None`` makes a browser-session cookie (the engine's idle and
            absolute deadlines still apply server-side).
        secure: Send only over HTTPS. Turn off only for plain-HTTP local development.
        samesite: ``"lax"`` (default), ``"strict"``, or ``"none"`` (which needs ``secure``).
        path: Cookie path.
        domain: Cookie domain; ``None`` binds it to the exact host.
        name: Cookie name (``SessionAuth.cookie_name``).

    Raises:
        ValueError: ``samesite="none"`` without ``secure`` (browsers drop such cookies).
    """
    if samesite == "none" and not secure:
        raise ValueError('samesite="none" requires secure=True')
    response.set_cookie(
        name,
        token,
        max_age=max_age,
        path=path,
        domain=domain,
        secure=secure,
        httponly=True,
        samesite=samesite,
    )


def clear_session_cookie(
    response: Response,
    *,
    secure: bool = True,
    samesite: SameSite = "lax",
    path: str = "/",
    domain: str | None = None,
    name: str = DEFAULT_COOKIE,
) -> None:
    """Tell the browser to drop the session cookie (same name, path and domain as set)."""
    response.delete_cookie(
        name, path=path, domain=domain, secure=secure, httponly=True, samesite=samesite
    )


class SessionAuth:
    """Where the token comes from and how refusals are worded; owns the dependencies.

    Attributes:
        cookie_name: Cookie read when there is no ``Authorization: Bearer`` header.
        realm: The ``realm`` of ``WWW-Authenticate`` challenges.
        bearer: Read ``Authorization: Bearer <token>``.
        cookie: Read the cookie.
        require_session: Dependency, see the module docstring.
        optional_session: Dependency, see the module docstring.
        current_token: Dependency, see the module docstring.
    """

    def __init__(
        self,
        *,
        cookie_name: str = DEFAULT_COOKIE,
        realm: str = "api",
        bearer: bool = True,
        cookie: bool = True,
    ) -> None:
        """Configure token sources.

        Args:
            cookie_name: Name of the session cookie.
            realm: Realm in ``WWW-Authenticate``; must not contain ``"`` or ``\\``.
            bearer: Accept ``Authorization: Bearer``.
            cookie: Accept the cookie.
        """
        if not (bearer or cookie):
            raise ValueError("enable at least one of bearer and cookie")
        if '"' in realm or "\\" in realm or not realm.isprintable():
            raise ValueError("realm must be printable and contain no quote or backslash")
        self.cookie_name = cookie_name
        self.realm = realm
        self.bearer = bearer
        self.cookie = cookie
        # The security objects only document the schemes in OpenAPI; reading is done here so
        # that a non-Bearer Authorization header falls back to the cookie.
        bearer_scheme = HTTPBearer(auto_error=False, description="Session token")
        cookie_scheme = APIKeyCookie(name=cookie_name, auto_error=False)

        async def read_token(
            request: Request,
            _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
            _cookie: Annotated[str | None, Depends(cookie_scheme)],
        ) -> str | None:
            return self.token_of(request)

        async def validated(
            token: Annotated[str | None, Depends(read_token)],
            engine: Annotated[SessionEngine, Depends(get_engine)],
        ) -> Session | None:
            if token is None:
                return None
            return await self._validate(engine, token, None)

        async def require_session(
            token: Annotated[str | None, Depends(read_token)],
            session: Annotated[Session | None, Depends(validated)],
        ) -> Session:
            if session is None:
                raise self._unauthorized(token is not None)
            return session

        async def optional_session(
            session: Annotated[Session | None, Depends(validated)],
        ) -> Session | None:
            return session

        async def current_token(token: Annotated[str | None, Depends(read_token)]) -> str:
            if token is None:
                raise self._unauthorized(False)
            return token

        require_session.__doc__ = "Dependency: the request's live ACTIVE session, or 401/503."
        optional_session.__doc__ = "Dependency: the live ACTIVE session, ``None``, or 503."
        current_token.__doc__ = "Dependency: the raw token of the request, or 401."
        self._read_token = read_token
        self.require_session: Callable[..., Awaitable[Session]] = require_session
        self.optional_session: Callable[..., Awaitable[Session | None]] = optional_session
        self.current_token: Callable[..., Awaitable[str]] = current_token

    def token_of(self, request: Request) -> str | None:
        """The token of a request: the Bearer credentials first, else the cookie.

        An empty value counts as absent. The token is not checked here; malformed tokens
        are refused by the engine before any Redis call.
        """
        if self.bearer:
            header = request.headers.get("authorization")
            if header:
                scheme, _, credentials = header.partition(" ")
                credentials = credentials.strip()
                if scheme.lower() == "bearer" and credentials:
                    return credentials
        if self.cookie:
            value = request.cookies.get(self.cookie_name)
            if value:
                return value
        return None

    async def _validate(
        self, engine: SessionEngine, token: str, states: frozenset[SessionState] | None
    ) -> Session | None:
        try:
            return await engine.validate(token, states)
        except EngineUnavailable as exc:
            raise _unavailable() from exc

    def _unauthorized(self, token_given: bool) -> HTTPException:
        challenge = f'Bearer realm="{self.realm}"'
        if token_given:
            challenge += ', error="invalid_token"'
        detail = "invalid or expired session" if token_given else "not authenticated"
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
        )

    def require_state(self, *states: SessionState) -> Callable[..., Awaitable[Session]]:
        """Dependency factory: a live session in one of ``states``.

        One round trip when the session is allowed. A token that is a live session in
        another state gets 403 (found with a second, non-refreshing read on that path only);
        one that is no session at all gets 401.

        Args:
            *states: The accepted states (at least one).
        """
        if not states:
            raise ValueError("require_state needs at least one state")
        allowed = frozenset(SessionState(s) for s in states)
        names = ", ".join(sorted(s.value for s in allowed))

        async def dependency(
            token: Annotated[str | None, Depends(self._read_token)],
            engine: Annotated[SessionEngine, Depends(get_engine)],
        ) -> Session:
            if token is None:
                raise self._unauthorized(False)
            session = await self._validate(engine, token, allowed)
            if session is not None:
                return session
            try:
                other = await engine.get(token)
            except EngineUnavailable as exc:
                raise _unavailable() from exc
            if other is None:
                raise self._unauthorized(True)
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"session state {other.state.value!r} is not allowed here "
                f"(allowed: {names})",
            )

        return dependency

    def require_user(
        self, user: str | Callable[[Session], bool]
    ) -> Callable[..., Awaitable[Session]]:
        """Dependency factory: an ACTIVE session of a given user, or one passing a check.

        Shares the validation of ``require_session`` (one round trip per request in all).

        Args:
            user: A user id the session must belong to, or a predicate on the session
                (e.g. ``lambda s: "admin" in s.data.get("roles", ())``).

        Returns:
            The dependency; it answers 401 like ``require_session`` and 403 when the
            session is live but not allowed.
        """
        check: Callable[[Session], bool] = (
            (lambda s: s.user_id == user) if isinstance(user, str) else user
        )

        async def dependency(session: Annotated[Session, Depends(self.require_session)]) -> Session:
            if not check(session):
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN, detail="this session may not access this resource"
                )
            return session

        return dependency

    def set_cookie(self, response: Response, token: str, **options: Any) -> None:
        """``set_session_cookie`` with this object's cookie name."""
        set_session_cookie(response, token, name=self.cookie_name, **options)

    def clear_cookie(self, response: Response, **options: Any) -> None:
        """``clear_session_cookie`` with this object's cookie name."""
        clear_session_cookie(response, name=self.cookie_name, **options)


def _unavailable() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="session store unavailable",
        headers={"Retry-After": "1"},
    )


default_auth: Final = SessionAuth()
"""The ``SessionAuth`` behind the module-level dependencies."""

require_session: Final = default_auth.require_session
optional_session: Final = default_auth.optional_session
current_token: Final = default_auth.current_token
require_state: Final = default_auth.require_state
require_user: Final = default_auth.require_user
