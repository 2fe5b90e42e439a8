"""FastAPI integration: an engine per app, dependencies that authenticate requests, and
the mapping of engine errors to HTTP answers.

Only this module imports FastAPI; the core engine does not need it
(``pip install 'redis-session-engine[fastapi]'``).

What it gives you:

* ``engine_lifespan(settings)``: a ``lifespan=`` for ``FastAPI`` that opens one
  ``SessionEngine`` at startup, keeps it on ``app.state.session_engine`` and closes it at
  shutdown; ``get_engine`` is the (async) dependency that hands it to endpoints.
* ``install_error_handlers(app)``: one line that turns every engine error an endpoint lets
  through into its HTTP answer (never a 500; table below). The same handlers as a dict for
  ``FastAPI(exception_handlers=engine_error_handlers())``.
* ``require_session``: the token from ``Authorization: Bearer <token>`` (first) or from the
  session cookie, validated in one round trip; the live ``Session`` or an error response:

  ======================================  ==============================================
  no token                                401, ``WWW-Authenticate: Bearer realm="..."``
  a token that is not a live ACTIVE       401, ``WWW-Authenticate: Bearer realm="...",
  session (garbage, expired, revoked,     error="invalid_token"``
  another state)
  cookie-authenticated unsafe request     403 (only with ``SessionAuth(csrf=True)``)
  from another site
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
* ``admin_router(guard)``: list a user's sessions, revoke one or all, behind a guard
  dependency the application supplies (``engine/_admin.py``).
* ``set_session_cookie`` / ``clear_session_cookie``: ``HttpOnly; Secure; SameSite=Lax``
  by default.

Engine errors (``install_error_handlers``); bodies are ``{"detail": ...}`` and never carry
a node address, a password or a token:

==========================  =====  ========================================================
``EngineUnavailable``       503    ``Retry-After: 1``; fail closed (``OutcomeUnknown``
                                   says the write may or may not have been applied)
``PayloadTooLarge``         413    session data or chat message over its byte limit
``InvalidArgument``         422    e.g. a user or room id over ``max_id_bytes`` *bytes*
                                   (422 like FastAPI's own validation errors: the request
                                   is well-formed, its content is refused)
``SessionConflict``         409    ``current_version`` in the body
``LimitExceeded``           409    ``SessionLimitExceeded`` (the user is at
                                   ``max_sessions_per_user``), ``ChatRoomLimitExceeded``:
                                   a state of the account, not a rate (retrying does not
                                   help), so not 429
``SessionNotFound``         401    with ``WWW-Authenticate: ... error="invalid_token"``:
                                   operations that raise it act on the caller's own token
                                   (rotate, update, chat while sessions own the chat).
                                   ``session_not_found=404`` for services whose endpoints
                                   act on other sessions (an admin API)
``ReplicationIncomplete``   503    ``Retry-After: 1``; body ``"durable": false``: the write
                                   was applied on the primary but fewer replicas than
                                   ``wait_replicas`` confirmed it, so it may be lost
any other ``EngineError``   503    an unexpected Redis reply; no details
==========================  =====  ========================================================

They also answer FastAPI's ``RequestValidationError`` (422) with the body FastAPI gives,
in ASCII-escaped JSON: FastAPI's own handler echoes the input and fails with a 500 when it
holds a lone surrogate (``"\\ud800"`` is valid JSON with no UTF-8 form).

Cookies. The default name is ``__Host-session`` for ``Secure`` cookies and ``session``
otherwise (plain-HTTP development). The ``__Host-`` prefix makes browsers accept the cookie
only with ``Secure``, ``Path=/`` and no ``Domain``, so a sibling subdomain cannot plant or
shadow it. ``SessionAuth`` reads only its configured name (``SessionAuth()`` reads
``__Host-session``; ``SessionAuth(cookie_secure=False)`` reads ``session``): accepting the
unprefixed name too would give the planting attack back. Browsers accept ``Secure`` cookies
from ``http://localhost``, so the default works in local development on localhost.

CSRF. Cookies are ambient credentials: ``SessionAuth(csrf=True)`` refuses (403) a
cookie-authenticated POST/PUT/PATCH/DELETE sent by a page of another origin: a request
whose ``Sec-Fetch-Site`` is ``same-site`` or ``cross-site``, or whose ``Origin`` is neither
the request's own (scheme and ``Host``) nor one of ``csrf_trusted_origins`` (passing
those turns the check on too). A request with neither header is not from a browser and
passes; ``Authorization: Bearer`` requests are never checked (a page cannot make a
browser add that header to a cross-site request). Behind a TLS-terminating proxy run
uvicorn with ``--proxy-headers`` or list the public origin in ``csrf_trusted_origins``.

Cost per request. Each dependency above is ONE async callable of the request (no
sub-dependency for FastAPI to solve, no thread-pool hop, the engine taken from
``request.app.state``): it reads the token once and validates it with one EVALSHA.
``require_session``, ``optional_session`` and ``require_user`` of one ``SessionAuth`` share
that validation within a request, and so does ``require_state`` when its states include
``ACTIVE``. In OpenAPI each shows as the ``HTTPBearer`` scheme;
``engine_lifespan`` adds the cookie scheme (``APIKeyCookie``) to the same operations at
startup, or ``document_cookie_auth(app)`` when the schema is built without starting the
app (a second security object per route would cost a second dependency per request).

The module-level dependencies use ``SessionAuth()`` defaults (cookie ``__Host-session``,
realm ``api``, no CSRF check). For other settings build your own ``SessionAuth`` and use
its attributes, which are the same dependencies:
``auth = SessionAuth(cookie_secure=False, csrf=True); Depends(auth.require_session)``.
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
        install_error_handlers,
        require_session,
        set_session_cookie,
    )

    app = FastAPI(lifespan=engine_lifespan())  # settings from ENGINE_* variables
    install_error_handlers(app)
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
# runtime (the signature of each dependency's __call__ is what it solves).

import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie
from fastapi.security.base import SecurityBase

from ._admin import SessionInfo, admin_router
from ._engine import SessionEngine
from ._errors import (
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
from ._models import Session, SessionState
from ._settings import EngineSettings

__all__ = [
    "DEFAULT_COOKIE",
    "PLAIN_COOKIE",
    "STATE_ATTRIBUTE",
    "SessionAuth",
    "SessionInfo",
    "admin_router",
    "clear_session_cookie",
    "current_token",
    "default_auth",
    "default_cookie_name",
    "document_cookie_auth",
    "engine_error_handlers",
    "engine_error_response",
    "engine_lifespan",
    "get_engine",
    "install_error_handlers",
    "optional_session",
    "require_session",
    "require_state",
    "require_user",
    "set_session_cookie",
]

STATE_ATTRIBUTE: Final = "session_engine"
"""The ``app.state`` attribute that holds the engine."""

DEFAULT_COOKIE: Final = "__Host-session"
"""Name of a ``Secure`` session cookie (the default): host-only, ``Path=/``, HTTPS only."""

PLAIN_COOKIE: Final = "session"
"""Name of a session cookie without ``Secure`` (plain-HTTP development)."""

SameSite = Literal["lax", "strict", "none"]
NotFoundStatus = Literal[401, 404]

_SAFE_METHODS: Final = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))
_ACTIVE: Final = SessionState.ACTIVE


def default_cookie_name(secure: bool) -> str:
    """``__Host-session`` for a ``Secure`` cookie, ``session`` otherwise."""
    return DEFAULT_COOKIE if secure else PLAIN_COOKIE


def _check_cookie_options(name: str, *, secure: bool, path: str, domain: str | None) -> None:
    # Browsers silently drop a prefixed cookie that breaks its prefix's rules: fail loudly.
    lowered = name.lower()
    if lowered.startswith("__host-") and not (secure and path == "/" and domain is None):
        raise ValueError(f"a {name!r} cookie needs secure=True, path='/' and no domain")
    if lowered.startswith("__secure-") and not secure:
        raise ValueError(f"a {name!r} cookie needs secure=True")


def engine_lifespan(
    settings: EngineSettings | None = None,
    *,
    engine: SessionEngine | None = None,
    freeze_gc: bool = False,
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
        freeze_gc: Once the engine is open, ``gc.collect()`` then ``gc.freeze()``: what
            start-up made (modules, the app, its routes, the engine) is never walked again
            by the garbage collector's full collections, which otherwise cost tens of
            milliseconds each under load and make the p99 of an endpoint (``bench.md``,
            section 6). Process-wide, so it is your call: turn it on in a service whose
            start-up is done when the lifespan enters (the usual case).

    Returns:
        A callable to pass as ``FastAPI(lifespan=...)``.
    """
    if settings is not None and engine is not None:
        raise ValueError("pass settings or engine, not both")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine if engine is not None else SessionEngine(settings or EngineSettings())
        document_cookie_auth(app)
        async with eng:
            setattr(app.state, STATE_ATTRIBUTE, eng)
            if freeze_gc:
                gc.collect()
                gc.freeze()
            try:
                yield
            finally:
                # Late requests get a clear "no engine" error, not a closed engine.
                delattr(app.state, STATE_ATTRIBUTE)

    return lifespan


async def get_engine(request: Request) -> SessionEngine:
    """Dependency: the app's open ``SessionEngine`` (see ``engine_lifespan``).

    ``async`` so that FastAPI calls it on the event loop, not in its thread pool.

    Raises:
        RuntimeError: The app has no engine: ``engine_lifespan`` is not its lifespan (or
            the lifespan did not run, as with a bare ``httpx.ASGITransport``).
    """
    return _engine_of(request)


def _engine_of(request: Request) -> SessionEngine:
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
    name: str | None = None,
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
        name: Cookie name (``SessionAuth.cookie_name``); by default ``__Host-session``
            when ``secure``, else ``session`` (``default_cookie_name``).

    Raises:
        ValueError: ``samesite="none"`` without ``secure``, or a ``__Host-`` name with a
            domain, another path or without ``secure`` (browsers drop such cookies).
    """
    if samesite == "none" and not secure:
        raise ValueError('samesite="none" requires secure=True')
    if name is None:
        name = default_cookie_name(secure)
    _check_cookie_options(name, secure=secure, path=path, domain=domain)
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
    name: str | None = None,
) -> None:
    """Tell the browser to drop the session cookie (same name, path and domain as set)."""
    if name is None:
        name = default_cookie_name(secure)
    _check_cookie_options(name, secure=secure, path=path, domain=domain)
    response.delete_cookie(
        name, path=path, domain=domain, secure=secure, httponly=True, samesite=samesite
    )


class SessionAuth:
    """Where the token comes from and how refusals are worded; owns the dependencies.

    Every dependency it hands out is ONE async callable of the request: it reads the token
    once, reaches the engine on ``request.app.state`` and validates in one round trip. No
    sub-dependency, no thread-pool hop. In OpenAPI each one is the ``HTTPBearer`` scheme; the
    cookie scheme is added to the same operations by ``engine_lifespan`` (or
    ``document_cookie_auth(app)``), since a second security object would be a second
    dependency for FastAPI to solve on every request.

    Attributes:
        cookie_name: Cookie read when there is no ``Authorization: Bearer`` header.
        cookie_secure: Whether the cookie is ``Secure`` (``set_cookie``'s default).
        realm: The ``realm`` of ``WWW-Authenticate`` challenges.
        bearer: Read ``Authorization: Bearer <token>``.
        cookie: Read the cookie.
        csrf: Refuse cross-site cookie-authenticated unsafe requests (403).
        csrf_trusted_origins: Other origins allowed to send them (``https://app.example``).
        require_session: Dependency, see the module docstring.
        optional_session: Dependency, see the module docstring.
        current_token: Dependency, see the module docstring.
    """

    def __init__(
        self,
        *,
        cookie_name: str | None = None,
        cookie_secure: bool = True,
        realm: str = "api",
        bearer: bool = True,
        cookie: bool = True,
        csrf: bool = False,
        csrf_trusted_origins: Iterable[str] = (),
    ) -> None:
        """Configure token sources.

        Args:
            cookie_name: Name of the session cookie; by default ``__Host-session`` when
                ``cookie_secure``, else ``session``.
            cookie_secure: The cookie is sent over HTTPS only. ``False`` only for
                plain-HTTP development (then the name cannot have the ``__Host-`` prefix).
            realm: Realm in ``WWW-Authenticate``; must not contain ``"`` or ``\\``.
            bearer: Accept ``Authorization: Bearer``.
            cookie: Accept the cookie.
            csrf: Check the origin of cookie-authenticated POST/PUT/PATCH/DELETE requests.
            csrf_trusted_origins: Origins (``scheme://host[:port]``) besides the request's
                own that may send them; giving any turns ``csrf`` on.

        Raises:
            ValueError: No token source, a bad realm or origin, or a ``__Host-`` cookie
                name without ``cookie_secure``.
        """
        if not (bearer or cookie):
            raise ValueError("enable at least one of bearer and cookie")
        if '"' in realm or "\\" in realm or not realm.isprintable():
            raise ValueError("realm must be printable and contain no quote or backslash")
        if cookie_name is None:
            cookie_name = default_cookie_name(cookie_secure)
        _check_cookie_options(cookie_name, secure=cookie_secure, path="/", domain=None)
        trusted = frozenset(_origin(o) for o in csrf_trusted_origins)
        self.cookie_name = cookie_name
        self.cookie_secure = cookie_secure
        self.realm = realm
        self.bearer = bearer
        self.cookie = cookie
        self.csrf = csrf or bool(trusted)
        self.csrf_trusted_origins = trusted
        # The validated ACTIVE session of a request, shared by this object's dependencies
        # (require_session + require_user in one endpoint validate once).
        self._memo_key = f"engine.fastapi.session.{id(self)}"
        self._challenge = f'Bearer realm="{realm}"'
        self._bearer_model = HTTPBearerModel(description="Session token")
        # Shown in OpenAPI next to the bearer scheme; only read by document_cookie_auth.
        self.cookie_scheme: APIKeyCookie | None = None
        if cookie:
            scheme_name = "APIKeyCookie"
            if cookie_name not in (DEFAULT_COOKIE, PLAIN_COOKIE):
                scheme_name += f"_{cookie_name}"
            self.cookie_scheme = APIKeyCookie(
                name=cookie_name, scheme_name=scheme_name, auto_error=False
            )
        self.require_session: Callable[..., Awaitable[Session]] = _RequireSession(self)
        self.optional_session: Callable[..., Awaitable[Session | None]] = _OptionalSession(self)
        self.current_token: Callable[..., Awaitable[str]] = _CurrentToken(self)

    def token_of(self, request: Request) -> str | None:
        """The token of a request: the Bearer credentials first, else the cookie.

        An empty value counts as absent. The token is not checked here; malformed tokens
        are refused by the engine before any Redis call. No CSRF check either.
        """
        return self._read(request)[0]

    def _read(self, request: Request) -> tuple[str | None, bool]:
        """The token and whether it came from the cookie (an ambient credential)."""
        if self.bearer:
            # The raw header list: cheaper than building request.headers for one lookup.
            for name, value in request.scope["headers"]:
                if name == b"authorization":
                    scheme, _, credentials = value.decode("latin-1").partition(" ")
                    credentials = credentials.strip()
                    if scheme.lower() == "bearer" and credentials:
                        return credentials, False
                    break
        if self.cookie:
            cookie = request.cookies.get(self.cookie_name)
            if cookie:
                return cookie, True
        return None, False

    def _token(self, request: Request) -> str | None:
        """The request's token, after the CSRF check of a cookie (403 when it fails)."""
        token, from_cookie = self._read(request)
        if from_cookie and self.csrf and not self._same_origin(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="cross-site request refused")
        return token

    def _same_origin(self, request: Request) -> bool:
        """CSRF check of a cookie-authenticated request (see the module docstring)."""
        if request.method in _SAFE_METHODS:
            return True
        headers = request.headers
        site = headers.get("sec-fetch-site")
        if site in ("same-origin", "none"):  # set by the browser; a page cannot forge it
            return True
        origin = headers.get("origin")
        if origin is None:
            # Browsers send Origin with every cross-origin unsafe request; a request
            # without it (and without Sec-Fetch-Site) is from a script or a tool.
            return site is None
        origin = origin.lower()
        if origin in self.csrf_trusted_origins:
            return True
        if site is not None:  # same-site or cross-site: only trusted origins
            return False
        own = f"{request.url.scheme}://{headers.get('host', '')}".lower()
        return origin == own

    async def _active(self, request: Request) -> tuple[str | None, Session | None]:
        """The token and its live ACTIVE session (``None`` if none), validated once per
        request whichever of this object's dependencies asks first."""
        scope = request.scope
        memo: tuple[str | None, Session | None] | None = scope.get(self._memo_key)
        if memo is not None:
            return memo
        token = self._token(request)
        session = None
        if token is not None:
            try:
                session = await _engine_of(request).validate(token)
            except EngineUnavailable as exc:
                raise _unavailable() from exc
        scope[self._memo_key] = token, session
        return token, session

    def _unauthorized(self, token_given: bool) -> HTTPException:
        if token_given:
            return HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="invalid or expired session",
                headers={"WWW-Authenticate": self._challenge + ', error="invalid_token"'},
            )
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="not authenticated",
            headers={"WWW-Authenticate": self._challenge},
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
        return _RequireState(self, frozenset(SessionState(s) for s in states))

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
        return _RequireUser(self, check)

    def set_cookie(self, response: Response, token: str, **options: Any) -> None:
        """``set_session_cookie`` with this object's cookie name and ``secure`` flag."""
        options.setdefault("secure", self.cookie_secure)
        set_session_cookie(response, token, name=self.cookie_name, **options)

    def clear_cookie(self, response: Response, **options: Any) -> None:
        """``clear_session_cookie`` with this object's cookie name and ``secure`` flag."""
        options.setdefault("secure", self.cookie_secure)
        clear_session_cookie(response, name=self.cookie_name, **options)


class _AuthDependency(SecurityBase):
    """One async dependency of a ``SessionAuth``; in OpenAPI, its ``HTTPBearer`` scheme.

    A ``SecurityBase`` so that FastAPI lists the scheme on every operation that uses it,
    without a sub-dependency; its only parameter is the request.
    """

    def __init__(self, auth: SessionAuth) -> None:
        self.auth = auth
        self.model = auth._bearer_model
        self.scheme_name = "HTTPBearer"

    def __repr__(self) -> str:
        return f"<{type(self).__name__.lstrip('_')} of SessionAuth(realm={self.auth.realm!r})>"


class _RequireSession(_AuthDependency):
    """Dependency: the request's live ACTIVE session, or 401/403/503."""

    async def __call__(self, request: Request) -> Session:
        token, session = await self.auth._active(request)
        if session is None:
            raise self.auth._unauthorized(token is not None)
        return session


class _OptionalSession(_AuthDependency):
    """Dependency: the live ACTIVE session, ``None``, or 403/503."""

    async def __call__(self, request: Request) -> Session | None:
        return (await self.auth._active(request))[1]


class _CurrentToken(_AuthDependency):
    """Dependency: the raw token of the request (not validated), or 401/403."""

    async def __call__(self, request: Request) -> str:
        memo = request.scope.get(self.auth._memo_key)  # read already by require_session
        token = memo[0] if memo is not None else self.auth._token(request)
        if token is None:
            raise self.auth._unauthorized(False)
        return token


class _RequireUser(_AuthDependency):
    """Dependency: an ACTIVE session passing a check (403 otherwise), or 401/503."""

    def __init__(self, auth: SessionAuth, check: Callable[[Session], bool]) -> None:
        super().__init__(auth)
        self.check = check

    async def __call__(self, request: Request) -> Session:
        token, session = await self.auth._active(request)
        if session is None:
            raise self.auth._unauthorized(token is not None)
        if not self.check(session):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail="this session may not access this resource"
            )
        return session


class _RequireState(_AuthDependency):
    """Dependency: a live session in one of some states (403 in another), or 401/503."""

    def __init__(self, auth: SessionAuth, states: frozenset[SessionState]) -> None:
        super().__init__(auth)
        self.states = states
        self.names = ", ".join(sorted(s.value for s in states))

    async def __call__(self, request: Request) -> Session:
        auth = self.auth
        scope = request.scope
        memo: tuple[str | None, Session | None] | None = scope.get(auth._memo_key)
        if memo is not None and memo[1] is not None and _ACTIVE in self.states:
            return memo[1]  # require_session of the same request found it ACTIVE
        token = auth._token(request)
        if token is None:
            raise auth._unauthorized(False)
        engine = _engine_of(request)
        try:
            session = await engine.validate(token, self.states)
            other = None if session is not None else await engine.get(token)
        except EngineUnavailable as exc:
            raise _unavailable() from exc
        if memo is None and (session is not None or _ACTIVE in self.states):
            # What require_session would find: the session if it is ACTIVE, else none.
            active = session if session is not None and session.state is _ACTIVE else None
            scope[auth._memo_key] = token, active
        if session is not None:
            return session
        if other is None:
            raise auth._unauthorized(True)
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"session state {other.state.value!r} is not allowed here "
            f"(allowed: {self.names})",
        )


def document_cookie_auth(app: FastAPI) -> None:
    """Show the session cookie scheme in ``app.openapi()`` next to the bearer scheme.

    Every operation that uses a ``SessionAuth`` dependency gets that object's cookie
    scheme as an alternative (``security: [{HTTPBearer: []}, {APIKeyCookie: []}]``).
    ``engine_lifespan`` calls it at startup; call it yourself when you build the schema
    without running the app. Calling it twice is harmless.
    """
    original = app.openapi
    if getattr(original, "_documents_cookie_auth", False):
        return

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            _add_cookie_schemes(app, schema)
            app.openapi_schema = schema
        return app.openapi_schema

    openapi._documents_cookie_auth = True  # type: ignore[attr-defined]
    app.openapi = openapi  # type: ignore[method-assign]
    app.openapi_schema = None  # built again, with the cookie schemes


def _add_cookie_schemes(app: FastAPI, schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    components = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        schemes = {
            dep.auth.cookie_scheme.scheme_name: dep.auth.cookie_scheme
            for dep in _auth_dependencies(route.dependant)
            if dep.auth.cookie_scheme is not None
        }
        if not schemes:
            continue
        operations = paths.get(route.path_format, {})
        for method in route.methods or ():
            operation = operations.get(method.lower())
            if operation is None:
                continue
            security = operation.setdefault("security", [])
            for name, scheme in schemes.items():
                components[name] = jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
                if {name: []} not in security:
                    security.append({name: []})


def _auth_dependencies(dependant: Dependant) -> Iterator[_AuthDependency]:
    stack = [dependant]
    while stack:
        current = stack.pop()
        if isinstance(current.call, _AuthDependency):
            yield current.call
        stack.extend(current.dependencies)


def _origin(value: str) -> str:
    """``scheme://host[:port]`` in lower case, as browsers send it in ``Origin``."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _unavailable() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="session store unavailable",
        headers={"Retry-After": "1"},
    )


ExceptionHandler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
"""The type ``FastAPI(exception_handlers=...)`` takes for each handler."""


def engine_error_response(
    exc: EngineError, *, session_not_found: NotFoundStatus = 401, realm: str = "api"
) -> JSONResponse:
    """The HTTP answer to an engine error (the table in the module docstring).

    Bodies never carry the text of an ``EngineUnavailable`` or of an unexpected error
    (they name nodes); only ``InvalidArgument`` messages, which describe the caller's input.

    Args:
        exc: The error.
        session_not_found: 401 (the caller's own session is gone) or 404.
        realm: Realm of the 401 challenge.
    """
    retry = {"Retry-After": "1"}
    if isinstance(exc, OutcomeUnknown):
        detail = "session store unavailable: the write may or may not have been applied"
        return JSONResponse({"detail": detail}, 503, headers=retry)
    if isinstance(exc, EngineUnavailable):
        return JSONResponse({"detail": "session store unavailable"}, 503, headers=retry)
    if isinstance(exc, PayloadTooLarge):
        return JSONResponse({"detail": str(exc)}, 413)
    if isinstance(exc, InvalidArgument):
        return JSONResponse({"detail": str(exc)}, 422)
    if isinstance(exc, SessionConflict):
        body = {"detail": "the session was changed concurrently"}
        return JSONResponse({**body, "current_version": exc.current_version}, 409)
    if isinstance(exc, LimitExceeded):
        if isinstance(exc, SessionLimitExceeded):
            detail = "this user has too many sessions"
        elif isinstance(exc, ChatRoomLimitExceeded):
            detail = "this user has too many chat rooms"
        else:
            detail = "a per-user limit would be exceeded"
        return JSONResponse({"detail": detail}, 409)
    if isinstance(exc, SessionNotFound):
        if session_not_found == 404:
            return JSONResponse({"detail": "session not found"}, 404)
        challenge = f'Bearer realm="{realm}", error="invalid_token"'
        return JSONResponse(
            {"detail": "invalid or expired session"}, 401, headers={"WWW-Authenticate": challenge}
        )
    if isinstance(exc, ReplicationIncomplete):
        detail = (
            "the write was applied but fewer replicas than required confirmed it: "
            "it may not be durable"
        )
        return JSONResponse({"detail": detail, "durable": False}, 503, headers=retry)
    return JSONResponse({"detail": "session store error"}, 503)


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: renders lone surrogates too."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def _request_validation_error(request: Request, exc: Exception) -> Response:
    # FastAPI's own handler echoes the input in UTF-8, and a JSON string with a lone
    # surrogate ("\ud800", valid JSON) has no UTF-8 form: its 422 became a 500.
    assert isinstance(exc, RequestValidationError)
    try:
        detail = jsonable_encoder(exc.errors())
    except (UnicodeError, ValueError, TypeError):
        detail = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
        detail = jsonable_encoder(detail)
    return _AsciiJSONResponse({"detail": detail}, 422)


def engine_error_handlers(
    *, session_not_found: NotFoundStatus = 401, realm: str = "api"
) -> dict[int | type[Exception], ExceptionHandler]:
    """Exception handlers for ``FastAPI(exception_handlers=...)``: every engine error.

    Also FastAPI's request validation errors (422), answered like FastAPI does but with
    ASCII-escaped JSON, so an input with a lone surrogate does not turn the 422 into a 500.

    Args:
        session_not_found: Status of ``SessionNotFound``: 401 (default) or 404.
        realm: Realm of the 401 challenge.
    """
    if session_not_found not in (401, 404):
        raise ValueError("session_not_found must be 401 or 404")

    async def handle_engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        return engine_error_response(exc, session_not_found=session_not_found, realm=realm)

    # Starlette picks a handler by the exception's MRO: one entry covers the whole tree.
    return {EngineError: handle_engine_error, RequestValidationError: _request_validation_error}


def install_error_handlers(
    app: FastAPI, *, session_not_found: NotFoundStatus = 401, realm: str = "api"
) -> None:
    """Answer every engine error an endpoint lets through with its HTTP status, never 500.

    ``install_error_handlers(app)`` once after ``app = FastAPI(...)``; see the table in the
    module docstring.

    Args:
        app: The application.
        session_not_found: Status of ``SessionNotFound``: 401 (default) or 404.
        realm: Realm of the 401 challenge.
    """
    for exc_class, handler in engine_error_handlers(
        session_not_found=session_not_found, realm=realm
    ).items():
        app.add_exception_handler(exc_class, handler)


default_auth: Final = SessionAuth()
"""The ``SessionAuth`` behind the module-level dependencies."""

require_session: Final = default_auth.require_session
optional_session: Final = default_auth.optional_session
current_token: Final = default_auth.current_token
require_state: Final = default_auth.require_state
require_user: Final = default_auth.require_user
