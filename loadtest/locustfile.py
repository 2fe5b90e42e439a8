"""Locust scenarios for the reference service (``loadtest/app.py``) and for the engine itself.

HTTP (the default; every simulated user is one person with a user id of its own)::

    locust -f loadtest/locustfile.py --headless -u 2000 -r 200 -t 60s \\
        --host http://127.0.0.1:8000

Each ``SessionUser`` logs in at start, then mixes (by weight): browsing (``GET /me``, the
validate-heavy hot path), chat (``POST`` + ``GET /chat/{room}``), token rotation, logout
and logout-everywhere (each followed by a check that the old token is dead and a new
login), and probes with invalid tokens, which must get 401: a probe answered with
anything else is a failure, and so is every non-2xx answer elsewhere.

Engine-direct (no HTTP; ``SessionEngine`` calls from an asyncio loop in a thread of each
Locust process), enabled with an environment variable and selected by class name::

    ENGINE_LOCUST_DIRECT=1 locust -f loadtest/locustfile.py --headless -u 200 -r 100 \\
        -t 30s --host redis://127.0.0.1:7000 EngineUser

Both run with the engine's local cache: the reference service turns it on (see
``loadtest/app.py``), and so does ``EngineUser`` (``ENGINE_LOCAL_CACHE_SIZE``, default
100,000; ``0`` turns it off). The dead-token checks after rotate, logout and logout-all
then also check read-your-writes: the probe follows the write on the same keep-alive
connection, so the uvicorn worker that revoked the token is the one asked, and it must
not answer from its cache. Another worker may serve the old token for the time one
invalidation message takes, never longer than ``local_cache_max_staleness``: Locust's client
sometimes moves a user to a new connection (seen in 2 of about 25 one-minute runs; where
it was recorded, ``x-worker`` named two workers), and then the probe is repeated after that bound
(``/me (other worker, after max staleness)``), where it must be refused.

The HTTP scenarios need only Locust (the stock ``locustio/locust`` image runs this file);
the engine is imported only by ``EngineUser``.

Think time: ``LOCUST_WAIT_MIN`` / ``LOCUST_WAIT_MAX`` seconds between tasks (default 5 to
20 s, a person reading a page; a task makes ~2.6 requests, so 2000 users offer ~400 req/s).
``1`` / ``3`` turns the same users into a saturation test.

Arrivals: Locust starts each second's ``--spawn-rate`` users at the same instant (its
dispatcher hands out ``floor(spawn_rate)`` users per one-second step), so ``-r 200`` would
be 200 logins in the same millisecond, then nothing for a second: not an arrival rate of
200 a second but a burst that no service of two workers drains in 100 ms, and what Locust
reported as the ramp-up's tail (p50 100-200 ms for logins while an independent client saw
2-4 ms; bench.md 3d). Each user therefore waits a random moment within that step
(``LOCUST_ARRIVAL_SPREAD`` seconds, default 1; 0 restores the lockstep) before it logs in:
the same users at the same rate, arriving as people do.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.monkey
from locust import User, between, events, task
from locust.contrib.fasthttp import FastHttpUser

if TYPE_CHECKING:
    from engine import EngineSettings, SessionEngine

WAIT_MIN = float(os.environ.get("LOCUST_WAIT_MIN", "5.0"))
WAIT_MAX = float(os.environ.get("LOCUST_WAIT_MAX", "20.0"))
ARRIVAL_SPREAD = float(os.environ.get("LOCUST_ARRIVAL_SPREAD", "1.0"))
# The service's local_cache_max_staleness (the engine's default unless its environment says)
MAX_STALENESS = float(os.environ.get("ENGINE_LOCAL_CACHE_MAX_STALENESS", "0.5"))
ENGINE_DIRECT = os.environ.get("ENGINE_LOCUST_DIRECT", "") not in ("", "0")
ROOMS = ("general", "random", "support")
LOCAL_CACHE_SIZE = 100_000  # EngineUser's local cache unless ENGINE_LOCAL_CACHE_SIZE is set


def _refused(r: Any) -> bool:
    return r.status_code == 401 and "invalid_token" in (r.headers.get("www-authenticate") or "")


def _garbage_token() -> str:
    """Tokens that must be refused: malformed ones and well-formed ones nobody issued."""
    kind = secrets.randbelow(4)
    if kind == 0:
        return "garbage"
    if kind == 1:
        return "x" * 300
    if kind == 2:
        return f"{{tag}}.{secrets.token_urlsafe(32)}"
    return f"{secrets.token_urlsafe(3)}.{secrets.token_urlsafe(32)}"  # well-formed, unknown


class SessionUser(FastHttpUser):
    """One person: logs in at start, then browses, chats, rotates and logs out.

    Every answer but the expected one is a failure. After a failure that may have cost the
    session (a 401 on its own token, or a 503 from a write whose outcome is unknown), the
    user logs in again at its next task instead of failing on every request after it.
    """

    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.user_id = f"user-{uuid.uuid4().hex}"
        self.token: str | None = None
        self.worker: str | None = None  # the x-worker of the last call()
        if ARRIVAL_SPREAD > 0:  # see "Arrivals" above
            gevent.sleep(ARRIVAL_SPREAD * secrets.randbelow(1_000_000) / 1_000_000)
        self.login()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def login(self) -> bool:
        with self.client.post(
            "/login", json={"user_id": self.user_id}, name="/login", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"login: {r.status_code} {r.error or ''}".strip())
                self.token = None
                return False
            self.token = r.json()["token"]
            return True

    def logged_in(self) -> bool:
        return self.token is not None or self.login()

    def call(self, method: str, path: str, name: str, **kwargs: Any) -> Any:
        """A request with this user's token that must answer 200; ``None`` otherwise."""
        with self.client.request(
            method, path, headers=self.auth(), name=name, catch_response=True, **kwargs
        ) as r:
            self.worker = r.headers.get("x-worker")
            if r.status_code == 200:
                return r.json()
            r.failure(f"{name}: {r.status_code} {r.error or ''}".strip())
            if r.status_code == 401 or (r.status_code == 503 and method == "POST"):
                self.token = None  # lost, or maybe lost: start over with a new login
            return None

    def expect_401(self, token: str, name: str, *, dead_since_write: bool = False) -> None:
        """``token`` must be refused. After this user's own write (``dead_since_write``):
        at once by the worker that wrote; by another worker within the local cache's
        staleness bound (the documented window: one invalidation message), checked again
        after that bound under the name ``/me (other worker, after max staleness)``."""
        with self.client.get("/me", headers=self.auth(token), name=name, catch_response=True) as r:
            if _refused(r):
                r.success()
                return
            answered = r.headers.get("x-worker")
            if not (dead_since_write and r.status_code == 200 and answered != self.worker):
                r.failure(
                    f"expected 401 invalid_token, got {r.status_code} "
                    f"(wrote on worker {self.worker}, answered by {answered})"
                )
                return
            # Not this request's failure: the connection moved to another worker, whose
            # cache may hold the token until the invalidation arrives.
            r.success()
        gevent.sleep(MAX_STALENESS)
        again = "/me (other worker, after max staleness)"
        with self.client.get("/me", headers=self.auth(token), name=again, catch_response=True) as r:
            if _refused(r):
                r.success()
            else:
                r.failure(
                    f"still {r.status_code} {MAX_STALENESS} s after the write "
                    f"(wrote on worker {self.worker}, answered by {r.headers.get('x-worker')})"
                )

    @task(20)
    def browse(self) -> None:
        for _ in range(3):
            if not self.logged_in() or self.call("GET", "/me", "/me") is None:
                return

    @task(5)
    def chat(self) -> None:
        if not self.logged_in():
            return
        room = ROOMS[secrets.randbelow(len(ROOMS))]
        text = {"text": f"hello {secrets.token_hex(8)}"}
        if self.call("POST", f"/chat/{room}", "/chat/[room] POST", json=text) is not None:
            self.call("GET", f"/chat/{room}?limit=20", "/chat/[room] GET")

    @task(2)
    def rotate(self) -> None:
        if not self.logged_in():
            return
        old = self.token
        body = self.call("POST", "/rotate", "/rotate")
        if body is not None and old is not None:
            self.token = body["token"]
            self.expect_401(old, "/me (rotated-out token)", dead_since_write=True)

    @task(1)
    def logout(self) -> None:
        # The dead-token probe runs only when the server confirmed the logout.
        if not self.logged_in():
            return
        old = self.token
        if self.call("POST", "/logout", "/logout") is not None and old is not None:
            self.expect_401(old, "/me (logged-out token)", dead_since_write=True)
        self.login()

    @task(1)
    def logout_all(self) -> None:
        if not self.logged_in():
            return
        old = self.token
        if self.call("POST", "/logout-all", "/logout-all") is not None and old is not None:
            self.expect_401(old, "/me (logged-out-all token)", dead_since_write=True)
        self.login()

    @task(3)
    def invalid_probe(self) -> None:
        self.expect_401(_garbage_token(), "/me (invalid token)")


# -- engine-direct ----------------------------------------------------------------------


class _EngineThread:
    """One asyncio loop in a real OS thread per Locust process, with one open engine.

    Locust monkey-patches ``threading`` into greenlets, so the thread is started with the
    original ``_thread.start_new_thread``; results come back to the gevent hub through
    ``run_callback_threadsafe``, the one thread-safe way into it.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: SessionEngine | None = None
        self._starting: gevent.event.AsyncResult | None = None

    def ensure(self, settings: EngineSettings) -> SessionEngine:
        if self._starting is None:
            self._starting = gevent.event.AsyncResult()
            hub_loop = gevent.get_hub().loop
            ready = self._starting

            from engine import SessionEngine  # noqa: PLC0415 - HTTP-only runs need no engine

            def run() -> None:
                try:
                    import uvloop  # noqa: PLC0415 - optional

                    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
                except ImportError:  # pragma: no cover
                    loop = asyncio.new_event_loop()
                asyncio.set_event_loop(loop)
                self.loop = loop
                try:
                    eng = loop.run_until_complete(SessionEngine(settings).open())
                except BaseException as exc:
                    hub_loop.run_callback_threadsafe(ready.set_exception, exc)
                    return
                self.engine = eng
                hub_loop.run_callback_threadsafe(ready.set, eng)
                loop.run_forever()
                loop.run_until_complete(eng.aclose())
                loop.close()

            start = gevent.monkey.get_original("_thread", "start_new_thread")
            start(run, ())
        result: SessionEngine = self._starting.get(timeout=30)
        return result

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10.0) -> Any:
        loop = self.loop
        assert loop is not None
        hub_loop = gevent.get_hub().loop
        result = gevent.event.AsyncResult()

        def deliver(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                result.set_exception(asyncio.CancelledError())
            elif (exc := fut.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set(fut.result())

        def start() -> None:
            fut = asyncio.ensure_future(fn(), loop=loop)
            fut.add_done_callback(lambda f: hub_loop.run_callback_threadsafe(deliver, f))

        loop.call_soon_threadsafe(start)
        return result.get(timeout=timeout)

    def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)


_engine_thread = _EngineThread()


@events.quitting.add_listener
def _stop_engine_thread(**_: Any) -> None:
    _engine_thread.stop()


class EngineUser(User):
    """``SessionEngine`` calls without HTTP, reported as request type ``engine``.

    Abstract (never picked) unless ``ENGINE_LOCUST_DIRECT=1``; then select it by name.
    ``--host redis://...`` sets the engine URL, otherwise ``ENGINE_*`` variables apply.
    """

    abstract = not ENGINE_DIRECT
    wait_time = between(WAIT_MIN / 10, WAIT_MAX / 10)

    def on_start(self) -> None:
        from engine import EngineSettings  # noqa: PLC0415 - HTTP-only runs need no engine

        fields: dict[str, Any] = {}
        if self.host and self.host.startswith(("redis://", "rediss://")):
            fields["url"] = self.host
        if not any(name.upper() == "ENGINE_LOCAL_CACHE_SIZE" for name in os.environ):
            fields["local_cache_size"] = LOCAL_CACHE_SIZE  # on, as in the reference service
        self.engine = _engine_thread.ensure(EngineSettings(**fields))
        self.user_id = f"user-{uuid.uuid4().hex}"
        self.token = self.op("create", lambda: self.engine.create(user_id=self.user_id)).token

    def op(self, name: str, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        t0 = time.perf_counter()
        exc: BaseException | None = None
        result: Any = None
        try:
            result = _engine_thread.call(fn)
        except Exception as e:
            exc = e
        self.environment.events.request.fire(
            request_type="engine",
            name=name,
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=0,
            exception=exc,
            context={},
        )
        if exc is not None:
            raise exc
        return result

    @task(20)
    def validate(self) -> None:
        session = self.op("validate", lambda: self.engine.validate(self.token))
        if session is None:
            self.environment.events.request.fire(
                request_type="engine",
                name="validate (live token refused)",
                response_time=0,
                response_length=0,
                exception=AssertionError("a live session did not validate"),
                context={},
            )

    @task(5)
    def chat(self) -> None:
        room = ROOMS[secrets.randbelow(len(ROOMS))]
        self.op("chat_append", lambda: self.engine.chat_append(self.user_id, room, {"t": "hi"}))
        self.op("chat_history", lambda: self.engine.chat_history(self.user_id, room, 20))

    @task(2)
    def rotate(self) -> None:
        self.token = self.op("rotate", lambda: self.engine.rotate(self.token)).token

    @task(1)
    def relogin(self) -> None:
        self.op("revoke", lambda: self.engine.revoke(self.token))
        self.token = self.op("create", lambda: self.engine.create(user_id=self.user_id)).token
