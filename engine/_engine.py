"""``SessionEngine``: sessions and chat history on Redis Cluster, one script per operation.

The engine turns tokens, ids and payloads into keys and script arguments, runs exactly one
script (EVALSHA) per operation through the transport, and turns the replies into models.
It never touches a socket. Everything it refuses, it refuses before any Redis call.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar, cast
from urllib.parse import unquote

import orjson
from pydantic import BaseModel

from ._credentials import build_ssl_context, password_provider, ssl_provider
from ._errors import (
    ChatRoomLimitExceeded,
    EngineError,
    EngineUnavailable,
    InvalidArgument,
    OutcomeUnknown,
    ReplicationIncomplete,
    ReplyError,
    SessionConflict,
    SessionLimitExceeded,
    SessionNotFound,
    map_reply_error,
)
from ._keys import ABSOLUTE, CREATED, HEADER_LEN, IDLE, STATE, VERSION, KeySpace, slot_of_tag
from ._lifecycle import State
from ._local_cache import LocalCache, Ticket
from ._metrics import Metrics
from ._models import EngineStats, MissReasons, NewSession, Session, SessionState, build_session
from ._payload import encode_data
from ._scripts import Script, scripts
from ._settings import MAX_TTL, MIN_TTL, EngineSettings
from ._tokens import new_token, parse_token, random_tag, session_id_of
from ._transport import Transport, TransportOptions, pack
from ._transport._tracking import CACHING_YES

if TYPE_CHECKING:
    from ._events import SessionEventStream

__all__ = ["SessionEngine"]

_MISS_UNKNOWN: Final = 0
_MISS_EXPIRED: Final = 1
_MISS_STATE: Final = 2
# One letter per state in the stored value (layout: _keys.py).
_STATE_CODE: Final = {
    SessionState.ACTIVE: "a",
    SessionState.PENDING: "p",
    SessionState.LOCKED: "l",
}
_STATE_BY_BYTE: Final = {ord(code): state for state, code in _STATE_CODE.items()}
_ALL_STATES: Final = "".join(_STATE_CODE.values()).encode()
_DEFAULT_STATES: Final = frozenset({SessionState.ACTIVE})
_YIELD_EVERY: Final = 255  # a local-cache hit yields to the loop once in 256 (a mask)


class _Unset(enum.Enum):
    UNSET = "unset"


_UNSET: Final = _Unset.UNSET
K = TypeVar("K")
T = TypeVar("T")
V = TypeVar("V")


class _WaitInterrupted(ReplicationIncomplete):
    """The write ran, then its ``WAIT`` got an error (``UNBLOCKED``: the primary became a
    replica) or no reply: nothing confirms it reached a replica. What callers see is a
    ``ReplicationIncomplete``; deletes resend (``_write_resending_once``)."""


def _ms_to_dt(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


def _memo_put(memo: dict[K, V], key: K, value: V, limit: int) -> None:
    """Insert into a bounded memo; when full, forget the older half (dicts keep insertion
    order), so recently seen tokens stay and the cost stays O(1) amortised."""
    if len(memo) >= limit:
        for old in list(itertools.islice(memo, max(1, limit // 2))):
            del memo[old]
    memo[key] = value


def _evalsha(script: Script, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    return pack((b"EVALSHA", script.sha, len(keys), *keys, *args))


def _states_arg(states: Collection[SessionState]) -> bytes:
    for s in states:
        if not isinstance(s, SessionState):
            raise InvalidArgument(f"states must be SessionState members, not {s!r}")
    return "".join(sorted(_STATE_CODE[s] for s in states)).encode()


class SessionEngine:
    """The session engine. One per process (or per event loop), shared by all requests.

    Example::

        async with SessionEngine(EngineSettings(url="redis://127.0.0.1:7000")) as eng:
            new = await eng.create(user_id="u1", data={"role": "admin"})
            session = await eng.validate(new.token)

    ``__init__`` does no I/O; ``open()`` (or ``async with``) connects, discovers the
    cluster and loads the scripts; ``aclose()`` is safe to call twice.
    """

    def __init__(self, settings: EngineSettings | None = None, **overrides: Any) -> None:
        """Build an engine; nothing is connected until ``open()``.

        Args:
            settings: The settings; ``EngineSettings()`` (from the environment) if omitted.
            **overrides: Setting fields that replace those of ``settings``.
        """
        if settings is None:
            settings = EngineSettings(**overrides)
        elif overrides:
            settings = EngineSettings(**{**settings.model_dump(), **overrides})
        self.settings: Final = settings
        tag_secret = (
            settings.tag_secret.get_secret_value().encode() if settings.tag_secret else None
        )
        self._keys = KeySpace(
            settings.key_prefix, tag_secret=tag_secret, max_id_bytes=settings.max_id_bytes
        )
        self._scripts = scripts()
        self._metrics = Metrics(settings.latency_window)
        self._transport: Transport | None = None
        self._cache: LocalCache | None = None
        self._state = State.NEW
        self._timeout = settings.command_timeout
        self._idle_ms = round(settings.idle_ttl * 1000)
        self._absolute_ms = round(settings.absolute_ttl * 1000)
        self._slack = repr(settings.refresh_slack).encode()  # validate.lua's ARGV[3]
        self._chat_ttl_ms = round(settings.chat_ttl * 1000)
        self._states_cache: dict[frozenset[SessionState], bytes] = {
            _DEFAULT_STATES: _states_arg(_DEFAULT_STATES)
        }
        self._wait = (
            pack(("WAIT", settings.wait_replicas, round(settings.wait_timeout * 1000)))
            if settings.wait_replicas
            else None
        )
        self._default_states = self._states_cache[_DEFAULT_STATES]
        self._derived: dict[str, tuple[int, str, str, bytes]] = {}
        self._heads: dict[bytes, tuple[str | None, SessionState, datetime, datetime, int]] = {}
        self._derived_max = settings.token_memo_size
        v = self._scripts["validate"]
        self._validate_sha = v.sha
        self._validate_script = v
        self._fallback_after = settings.replica_fallback_after

    @classmethod
    def from_url(cls, url: str, **settings_fields: Any) -> SessionEngine:
        """An engine for ``url`` with the other settings given as keyword arguments."""
        return cls(EngineSettings(url=url, **settings_fields))

    # -- life cycle -------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect, detect cluster or standalone, load the scripts on every primary."""
        if self._state is State.OPEN:
            return self
        if self._state is State.CLOSED:
            raise EngineError("this engine was closed; make a new one")
        s = self.settings
        tls_files = ssl_provider(s)  # re-read on reconnect once rotated
        options = TransportOptions(
            ssl=tls_files() if tls_files else self._ssl_context(),
            ssl_provider=tls_files,
            password_provider=password_provider(s),
            url=s.url,
            username=s.username,
            password=s.password.get_secret_value() if s.password else None,
            command_timeout=s.command_timeout,
            connect_timeout=s.connect_timeout,
            max_inflight_per_node=s.max_inflight_per_node,
            breaker_failures=s.breaker_failures,
            breaker_reset=s.breaker_reset,
        )
        self._transport = await Transport.open(options, list(self._scripts.values()))
        if s.local_cache_size:
            self._cache = LocalCache(
                self._transport, s.local_cache_size, s.local_cache_max_staleness, s.refresh_slack
            )
            self._cache.start()
        self._state = State.OPEN
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``rediss://`` URLs, from the ``tls_*`` settings."""
        return build_ssl_context(self.settings)

    async def aclose(self) -> None:
        """Close the connections. Safe to call more than once."""
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        if self._cache is not None:
            self._cache.close()
        if self._transport is not None:
            await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def transport(self) -> Transport:
        """The open transport (for tools and tests; applications should not need it)."""
        if self._transport is None or self._state is not State.OPEN:
            raise EngineError("the engine is not open: use `async with SessionEngine(...)`")
        return self._transport

    @property
    def is_cluster(self) -> bool:
        return self.transport.cluster

    @property
    def keys(self) -> KeySpace:
        """The key layout (read-only use: tests and tools)."""
        return self._keys

    # -- sending ----------------------------------------------------------------------
    #
    # Every operation goes through _call (one command to the slot of a tag, errors counted):
    # reads through _run/_command, writes through _write (WAIT, no resend after a lost
    # reply). The one exception is validate's fast lane, which skips a coroutine layer and
    # hands anything it cannot use to the transport's call().

    async def _run(
        self,
        script: Script,
        tag: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        operation: str,
    ) -> Any:
        """Run a reading script in the slot of ``tag`` and return its reply; map errors."""
        return await self._command(tag, _evalsha(script, keys, args), operation, script=script)

    async def _command(
        self, tag: str, packed: bytes, operation: str, *, script: Script | None = None
    ) -> Any:
        """A read (safe to resend) in the slot of ``tag``: its reply; error replies raised."""
        reply = await self._call(tag, packed, script=script, idempotent=True, then=None)
        if type(reply) is ReplyError:
            raise map_reply_error(reply, operation=operation)
        return reply

    async def _write(
        self,
        script: Script,
        tag: str,
        keys: Sequence[str],
        args: Sequence[Any],
        convert: Callable[[Any, int | None], T],
        *,
        operation: str,
        deadline: float | None = None,
        sessions: bool = True,
    ) -> T:
        """Run a writing script, then ``WAIT`` (on the node's durable connection) if
        ``wait_replicas``.

        ``sessions``: the script may change the sessions of ``tag``'s user, so the local
        cache drops them, before (reads in flight are not stored) and after (a read that
        ran before the write and answered late is not served).

        ``convert(reply, acknowledged)`` turns the reply into the call's result (and raises
        for replies that wrote nothing, e.g. "not found"). When fewer replicas than asked
        acknowledged, ``ReplicationIncomplete`` carries that result: the write happened.
        Never sent again after a lost reply (``OutcomeUnknown``); deletes, which may be, go
        through ``_write_resending_once``.
        """
        then = self._wait
        cache = self._cache if sessions else None
        if cache is not None:
            cache.forget_tag(tag)
        try:
            reply = await self._call(
                tag,
                _evalsha(script, keys, args),
                script=script,
                idempotent=False,
                then=then,
                deadline=deadline,
            )
        finally:
            if cache is not None:
                cache.forget_tag(tag)
        acked: Any = None
        if then is not None:
            reply, acked = reply
        if type(reply) is ReplyError:
            raise map_reply_error(reply, operation=operation)
        if then is None:
            return convert(reply, None)
        wanted = self.settings.wait_replicas
        if type(acked) is not int:
            # An error reply (UNBLOCKED: the primary became a replica during WAIT) or a
            # lost connection after the write's reply: the write ran, but nobody confirmed
            # that it reached a replica.
            result = convert(reply, 0)
            raise _WaitInterrupted(
                f"{operation}: WAIT failed: {acked}", acknowledged=0, wanted=wanted, result=result
            )
        result = convert(reply, acked)
        if acked < wanted:
            raise ReplicationIncomplete(
                f"{operation}: {acked} of {wanted} replicas acknowledged in time",
                acknowledged=acked,
                wanted=wanted,
                result=result,
            )
        return result

    async def _call(
        self,
        tag: str,
        packed: bytes,
        *,
        script: Script | None,
        idempotent: bool,
        then: bytes | None,
        deadline: float | None = None,
    ) -> Any:
        if deadline is None:
            deadline = self._write_deadline() if then is not None else None
        try:
            return await self.transport.call(
                slot_of_tag(tag),
                packed,
                script=script,
                idempotent=idempotent,
                then=then,
                deadline=deadline,
            )
        except EngineUnavailable:
            self._metrics.errors += 1
            raise

    def _write_deadline(self) -> float:
        """The loop time by which a write (and its WAIT, if any) must be answered.

        A durable write may wait for the WAIT in flight on its connection, then its own
        (group commit, see the transport): two ``wait_timeout`` at most.
        """
        extra = 2 * self.settings.wait_timeout if self._wait is not None else 0.0
        return self.transport.deadline(self.settings.command_timeout + extra)

    def _ttl_ms(self, value: float | None, default: int, what: str) -> int:
        if value is None:
            return default
        # The range check comes first: it also refuses NaN, and math.isfinite would raise
        # OverflowError on an int too large for a float.
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not MIN_TTL <= value <= MAX_TTL
        ):
            raise InvalidArgument(
                f"{what} must be a number of seconds from {MIN_TTL:g} to {MAX_TTL:g}"
            )
        return round(value * 1000)

    def _session(self, session_id: str, record: Sequence[Any]) -> Session:
        """A Session from a record reply ``[value, pttl_ms]`` (layout: lua/_prelude.lua)."""
        head, _, data = record[0].partition(b"|")  # digits and a percent-encoded owner: no '|'
        fixed = self._heads.get(head) or self._parse_head(head)
        return build_session(
            {
                "session_id": session_id,
                "user_id": fixed[0],
                "state": fixed[1],
                "data": orjson.loads(data),
                "created_at": fixed[2],
                # The server sent the remaining TTL; the local clock turns it into a time.
                "expires_at": datetime.fromtimestamp(time.time() + record[1] / 1000.0, UTC),
                "absolute_expires_at": fixed[3],
                "version": fixed[4],
            }
        )

    def _parse_head(self, head: bytes) -> tuple[str | None, SessionState, datetime, datetime, int]:
        """The parts of a stored session that change only on update, memoised like tokens:
        a session validated on every request has the same head every time."""
        owner = head[HEADER_LEN:]
        user = (unquote(owner.decode()) if b"%" in owner else owner.decode()) if owner else None
        fixed = (
            user,
            _STATE_BY_BYTE[head[STATE.start]],
            _ms_to_dt(int(head[CREATED.slice])),
            _ms_to_dt(int(head[ABSOLUTE.slice])),
            int(head[VERSION.slice]),
        )
        if self._derived_max:
            _memo_put(self._heads, head, fixed, self._derived_max)
        return fixed

    def _pack_validate(self, key: str, states_arg: bytes) -> bytes:
        return pack((b"EVALSHA", self._validate_sha, b"1", key, states_arg, b"1", self._slack))

    def _derive(self, token: object) -> tuple[int, str, str, bytes] | None:
        """``(slot, session_id, key, packed validate)`` of a token; ``None`` if it does not parse.

        Pure function of the token, memoised: a live session's token comes back on every
        request, and parsing + SHA-256 + key building is a third of the client's CPU per
        validation. The memo holds no validity (Redis is asked every time) and forgets its
        older half when full, so a flood of random tokens costs nothing but misses.
        """
        parsed = parse_token(token)
        if parsed is None:
            return None
        tag, secret = parsed
        sid = session_id_of(secret)
        key = self._keys.session(tag, sid)
        derived = (
            slot_of_tag(tag),
            sid,
            key,
            # The whole EVALSHA of a validate with the default states, ready to write.
            self._pack_validate(key, self._default_states),
        )
        if self._derived_max:
            # parse_token only accepts str, so the token is a str here.
            _memo_put(self._derived, cast(str, token), derived, self._derived_max)
        return derived

    def _state_set(self, states: Collection[SessionState]) -> Collection[SessionState]:
        self._states(states)  # the same checks (and errors) as on the way to Redis
        return states

    def _states(self, states: Collection[SessionState] | None) -> bytes:
        if states is None:
            return self._states_cache[_DEFAULT_STATES]
        try:
            key = frozenset(states)
        except TypeError:  # not iterable, or holding something unhashable
            raise InvalidArgument("states must be a collection of SessionState") from None
        arg = self._states_cache.get(key)
        if arg is None:
            if not key:
                raise InvalidArgument("states must not be empty")
            arg = _states_arg(key)
            if len(self._states_cache) < 16:  # there are only 7 non-empty sets of 3 states
                self._states_cache[key] = arg
        return arg

    # -- sessions ---------------------------------------------------------------------

    async def create(
        self,
        user_id: str | None = None,
        data: dict[str, Any] | BaseModel | None = None,
        *,
        state: SessionState = SessionState.ACTIVE,
        idle_ttl: float | None = None,
        absolute_ttl: float | None = None,
    ) -> NewSession:
        """Create a session and return its token (the only copy) with the stored session.

        Args:
            user_id: The owner; ``None`` makes an anonymous session (random slot).
            data: JSON-serialisable dict or a pydantic model (stored as its JSON).
            state: Initial state.
            idle_ttl: Override of the setting, seconds.
            absolute_ttl: Override of the setting, seconds. The idle TTL never runs past it.

        Raises:
            InvalidArgument: bad user id, state or TTL. PayloadTooLarge: data too large.
            SessionLimitExceeded: the user is at ``max_sessions_per_user`` and the policy
                is ``refuse``. EngineUnavailable: nothing was written (OutcomeUnknown: the
                reply was lost; a session may exist that nobody holds the token of).
            ReplicationIncomplete: ``wait_replicas`` not met (the session exists).
        """
        if not isinstance(state, SessionState):
            raise InvalidArgument(f"state must be a SessionState, not {state!r}")
        raw = encode_data(data, self.settings.max_payload_bytes, "data")
        idle = self._ttl_ms(idle_ttl, self._idle_ms, "idle_ttl")
        absolute = self._ttl_ms(absolute_ttl, self._absolute_ms, "absolute_ttl")
        if absolute < idle:
            raise InvalidArgument("absolute_ttl must be >= idle_ttl")
        if user_id is None:
            tag = random_tag()
            user_enc = ""
        else:
            self._keys.check_id(user_id, "user_id")
            tag = self._keys.user_tag(user_id)
            user_enc = self._keys.encode_id(user_id)
        return await self._create(tag, user_id, user_enc, _STATE_CODE[state], raw, idle, absolute)

    async def _create(
        self,
        tag: str,
        user_id: str | None,
        user_enc: str,
        state: str,
        raw: bytes,
        idle: int,
        absolute: int,
    ) -> NewSession:
        # Not sent again after a lost reply (OutcomeUnknown): a resend after a revoke_user
        # that ran in between would bring the revoked session back. What the lost try may
        # have made is a session whose token nobody holds: it idles out.
        token = new_token(tag)
        sid = session_id_of(token[len(tag) + 1 :])
        keys = [self._keys.session(tag, sid)]
        if user_id is not None:
            keys.append(self._keys.user_index(tag, user_id))
        policy = "evict" if self.settings.session_limit_policy == "evict_oldest" else "refuse"

        def created(reply: Any, acked: int | None) -> NewSession:
            if reply == -1:
                raise SessionLimitExceeded(
                    f"user already has {self.settings.max_sessions_per_user} sessions"
                )
            session = self._session(sid, reply)
            return NewSession(token=token, session=session, replicas_acknowledged=acked)

        return await self._write(
            self._scripts["create"],
            tag,
            keys,
            (
                sid,
                user_enc,
                state,
                raw,
                idle,
                absolute,
                self.settings.max_sessions_per_user,
                policy,
                self._keys.base(tag),
            ),
            created,
            operation="create",
        )

    async def validate(
        self, token: str, states: Collection[SessionState] | None = None
    ) -> Session | None:
        """THE hot path: is this a live session in an allowed state? Refreshes its idle TTL.

        One EVALSHA on one node. Returns ``None`` for anything that is not a live session
        in one of ``states`` (default ``{ACTIVE}``), including tokens that do not parse
        (those never reach Redis).

        Raises:
            EngineUnavailable: Redis did not answer in time. Never "valid" by default.
        """
        m = self._metrics
        m.validations += 1
        # The memo lookup needs a hashable key; anything but a str is not a token anyway.
        derived = (self._derived.get(token) if type(token) is str else None) or self._derive(token)
        if derived is None:
            m.miss_malformed += 1
            return None
        transport = self._transport
        if transport is None or self._state is not State.OPEN:
            raise EngineError("the engine is not open: use `async with SessionEngine(...)`")
        cache = self._cache
        ticket: Ticket | None = None
        if cache is not None:
            allowed = _DEFAULT_STATES if states is None else self._state_set(states)
            hit = self._cache_hit(cache, derived, allowed)
            if hit is not None:
                if not cache.hits & _YIELD_EVERY:
                    # A hit never waits for anything: a loop of them would starve the
                    # event loop, and with it the liveness probes that keep the entries
                    # servable. Every 256th hit lets the loop run once.
                    await asyncio.sleep(0)
                return hit or None
            ticket = cache.ticket(derived[0])
        t0 = time.perf_counter()
        if states is None:
            packed = derived[3]
        else:
            packed = self._pack_validate(derived[2], self._states(states))
        deadline = transport.loop.time() + self._timeout
        # A reply the local cache may store must have its key tracked: CLIENT CACHING YES
        # goes just before it (tracking is OPTIN, see engine/_transport/_tracking.py).
        fut = transport.try_send(
            derived[0], packed, deadline, None if ticket is None else CACHING_YES
        )
        reply: Any = None
        if self._fallback_after is not None:
            try:
                states_arg = self._default_states if states is None else self._states(states)
                reply, direct = await self._validate_falling_back(
                    derived, states_arg, packed, deadline, fut
                )
            except EngineUnavailable:
                m.errors += 1
                raise
            if not direct:
                ticket = None
        else:
            if fut is not None:
                try:
                    reply = await fut
                except Exception as exc:  # the transport's own failure type: call() decides
                    reply = exc
            if fut is None or (type(reply) is not list and isinstance(reply, Exception)):
                # Slow path: redirects, NOSCRIPT, reconnects, retries, back-pressure; it
                # carries on from the first try's outcome rather than sending the command
                # again first. Its reply may come from another node: never stored in the
                # local cache.
                ticket = None
                try:
                    reply = await transport.call(
                        derived[0],
                        packed,
                        deadline=deadline,
                        script=self._validate_script,
                        first=reply,
                    )
                except EngineUnavailable:
                    m.errors += 1
                    raise
        m.latency((time.perf_counter() - t0) * 1000.0)
        session = self._validated(derived[1], reply)
        if ticket is not None and session is not None:
            self._cache_store(derived, session, reply, ticket)
        return session

    async def _validate_falling_back(
        self,
        derived: tuple[int, str, str, bytes],
        states_arg: bytes,
        packed: bytes,
        deadline: float,
        fut: asyncio.Future[Any] | None,
    ) -> tuple[Any, bool]:
        """``validate`` with ``replica_fallback_after``: the primary's reply, or a replica's
        if the primary has not answered in that time (or failed); ``(reply, direct)``,
        ``direct`` when it is the fast lane's first reply (the only kind the local cache
        stores). A replica read runs the script read-only (EVAL_RO, no refresh).
        """
        transport = self.transport
        loop = transport.loop
        slot = derived[0]
        script = self._validate_script

        async def from_primary() -> tuple[Any, bool]:
            first: Any = None
            if fut is not None:
                try:
                    first = await fut
                except Exception as exc:  # the transport's own failure type: call() decides
                    first = exc
                if type(first) is list or type(first) is int:
                    return first, True
            reply = await transport.call(
                slot, packed, deadline=deadline, script=script, first=first
            )
            return reply, False

        primary = loop.create_task(from_primary())
        assert self._fallback_after is not None
        done, _ = await asyncio.wait((primary,), timeout=self._fallback_after)
        if done and primary.exception() is None:
            return primary.result()
        read_only = pack((b"EVAL_RO", script.source, b"1", derived[2], states_arg, b"0", b"0"))
        replica = loop.create_task(transport.call_replica(slot, read_only, deadline))
        pending: set[asyncio.Task[Any]] = {primary, replica}
        task: asyncio.Task[Any]
        failures: list[str] = []
        try:
            while pending:
                left = deadline - loop.time()
                if left <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    error = task.exception()
                    if error is None:
                        result = task.result()
                        return result if task is primary else (result, False)
                    failures.append(str(error))
        finally:
            for loose in (primary, replica):
                if not loose.done():
                    loose.cancel()
                elif not loose.cancelled():
                    loose.exception()  # retrieved
        raise EngineUnavailable(
            f"validate: neither the primary nor a replica answered: {'; '.join(failures)}"
        )

    def _cache_store(
        self, derived: tuple[int, str, str, bytes], session: Session, reply: Any, ticket: Ticket
    ) -> None:
        value: bytes = reply[0]
        cache = self._cache
        assert cache is not None
        cache.store(
            derived[2],
            derived[0],
            session,
            value.partition(b"|")[2],
            ticket,
            reply[1],
            int(value[IDLE.slice]),
        )

    def _validated(self, sid: str, reply: Any) -> Session | None:
        m = self._metrics
        if type(reply) is list:
            m.hits += 1
            return self._session(sid, reply)
        if reply == _MISS_UNKNOWN:
            m.miss_unknown += 1
        elif reply == _MISS_EXPIRED:
            m.miss_expired += 1
        elif reply == _MISS_STATE:
            m.miss_state += 1
        elif type(reply) is ReplyError:
            m.errors += 1
            raise map_reply_error(reply, operation="validate")
        return None

    async def validate_many(
        self, tokens: Iterable[str], states: Collection[SessionState] | None = None
    ) -> list[Session | None]:
        """Validate many tokens at once: one pipelined round per node, results in order.

        Tokens are taken from ``tokens`` and sent in batches of ``bulk_batch`` (setting,
        default 5,000), each with its own ``command_timeout`` deadline, so a very long list
        is not held to the deadline of one call, and only one batch is prepared at a time
        (``tokens`` may be a generator of millions).

        Raises:
            EngineUnavailable: if any token's node did not answer in time (fail closed:
                a partial answer could hide a revoked session as "unknown").
        """
        states_arg = self._states(states)
        default = states is None
        allowed = _DEFAULT_STATES if states is None else states
        m = self._metrics
        transport = self.transport
        derived_cache = self._derived
        derive = self._derive
        cache = self._cache
        batch = self.settings.bulk_batch
        out: list[Session | None] = []
        source = iter(tokens)
        while chunk := list(itertools.islice(source, batch)):
            m.validations += len(chunk)
            items: list[tuple[int, bytes]] = []
            # Flat lists, not (position, id) pairs: a tuple per token is one more object
            # for the garbage collector to walk (measured: +9 % instructions).
            positions: list[int] = []
            sent: list[tuple[int, str, str, bytes]] = []
            tickets: list[Ticket | None] = []
            for tok in chunk:
                out.append(None)
                derived = derived_cache.get(tok) if type(tok) is str else None
                if derived is None:
                    derived = derive(tok)
                    if derived is None:
                        m.miss_malformed += 1
                        continue
                if cache is not None:
                    hit = self._cache_hit(cache, derived, allowed)
                    if hit is not None:
                        out[-1] = hit or None
                        if not cache.hits & _YIELD_EVERY:
                            await asyncio.sleep(0)  # as in validate
                        continue
                    tickets.append(cache.ticket(derived[0]))
                if default:
                    items.append((derived[0], derived[3]))
                else:
                    items.append((derived[0], self._pack_validate(derived[2], states_arg)))
                positions.append(len(out) - 1)
                sent.append(derived)
            if not items:
                continue
            direct = [True] * len(items) if cache is not None else None
            replies = await transport.call_many(
                items,
                script=self._validate_script,
                direct=direct,
                prefix=None if cache is None else CACHING_YES,
            )
            failed = next((r for r in replies if isinstance(r, EngineUnavailable)), None)
            if failed is not None:
                m.errors += 1
                raise EngineUnavailable(f"validate_many: {failed}") from failed
            validated = self._validated
            for i, (pos, derived, reply) in enumerate(zip(positions, sent, replies, strict=True)):
                session = out[pos] = validated(derived[1], reply)
                if direct is not None and session is not None and direct[i]:
                    ticket = tickets[i]
                    if ticket is not None:
                        self._cache_store(derived, session, reply, ticket)
        return out

    def _cache_hit(
        self,
        cache: LocalCache,
        derived: tuple[int, str, str, bytes],
        allowed: Collection[SessionState],
    ) -> Session | Literal[False] | None:
        """The local cache's answer: the session, ``False`` (cached, but its state is not
        allowed: a miss without Redis), or ``None`` (ask Redis)."""
        entry = cache.entries.get(derived[2])
        if entry is None:
            cache.misses += 1
            return None
        tracker = entry.tracker
        now = time.monotonic()
        if not (
            now < entry.until
            and now < tracker.fresh_until
            and self.transport.node_for_slot(derived[0]) is tracker.node
        ):
            cache.expired(derived[2], entry, now)
            cache.misses += 1
            return None
        m = self._metrics
        session = entry.session
        if session.state not in allowed:
            m.miss_state += 1
            return False
        cache.entries.move_to_end(derived[2])
        cache.hits += 1
        m.hits += 1
        return build_session({**session.__dict__, "data": orjson.loads(entry.data)})

    async def get(self, token: str) -> Session | None:
        """Read a session in any state without refreshing it; ``None`` if not live."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        tag, secret = parsed
        sid = session_id_of(secret)
        reply = await self._run(
            self._validate_script,
            tag,
            [self._keys.session(tag, sid)],
            (_ALL_STATES, b"0", b"0"),
            operation="get",
        )
        return self._session(sid, reply) if type(reply) is list else None

    async def update(
        self,
        token: str,
        data: dict[str, Any] | BaseModel | _Unset | None = _UNSET,
        state: SessionState | None = None,
        expected_version: int | None = None,
    ) -> Session:
        """Replace a live session's data and/or state; compare-and-set on ``version``.

        Raises:
            SessionNotFound: the session is gone (or the token is malformed).
            SessionConflict: ``expected_version`` is not the stored version.
            PayloadTooLarge / InvalidArgument: refused before any write.
            OutcomeUnknown: the reply was lost; the update may or may not have been applied
                (it is not sent again).
        """
        parsed = parse_token(token)
        if parsed is None:
            raise SessionNotFound("no such session")
        if state is not None and not isinstance(state, SessionState):
            raise InvalidArgument(f"state must be a SessionState, not {state!r}")
        if expected_version is not None and (
            type(expected_version) is not int or expected_version < 0
        ):
            raise InvalidArgument("expected_version must be a non-negative int")
        has_data = data is not _UNSET
        raw = (
            encode_data(data, self.settings.max_payload_bytes, "data")
            if not isinstance(data, _Unset)
            else b""
        )
        tag, secret = parsed
        sid = session_id_of(secret)

        def updated(reply: Any, _: int | None) -> Session:
            if reply == 0:
                raise SessionNotFound("no such session")
            if reply[0] == b"conflict":
                raise SessionConflict(
                    f"version is {reply[1]}, not {expected_version}",
                    current_version=int(reply[1]),
                )
            return self._session(sid, reply)

        return await self._write(
            self._scripts["update"],
            tag,
            [self._keys.session(tag, sid)],
            (
                b"1" if has_data else b"0",
                raw,
                _STATE_CODE[state] if state is not None else "",
                -1 if expected_version is None else expected_version,
            ),
            updated,
            operation="update",
        )

    async def rotate(self, token: str, user_id: str | None = None) -> NewSession:
        """Issue a new token for a live session; the old token stops working at once.

        With ``user_id`` (login of an anonymous session, or a change of owner) the session
        moves to that user's slot: it is taken from the old slot and created in the new one
        with its data and state (two scripts; if the second fails, the session is gone,
        never duplicated). Without, or with the same owner, it is one script.

        Raises:
            SessionNotFound: the old session is not live.
        """
        parsed = parse_token(token)
        if parsed is None:
            raise SessionNotFound("no such session")
        tag, secret = parsed
        old_sid = session_id_of(secret)
        if user_id is not None:
            self._keys.check_id(user_id, "user_id")
            new_tag = self._keys.user_tag(user_id)
        else:
            new_tag = tag
        if new_tag == tag:
            owner = self._keys.encode_id(user_id) if user_id is not None else ""
            return await self._rotate_in_slot(tag, old_sid, owner)
        # Different slot: take (delete and read) first, so the old token is dead before the
        # new one exists; a failure in between logs the user out rather than cloning. Both
        # steps are writes like any other: WAITed under wait_replicas, never sent again
        # after a lost reply (a resend would find the session taken and lose its data).
        taken: ReplicationIncomplete | None = None
        try:
            record = await self._write(
                self._scripts["revoke"],
                tag,
                [self._keys.session(tag, old_sid)],
                (old_sid, self._keys.base(tag), ""),
                lambda reply, _: reply,
                operation="rotate",
            )
        except ReplicationIncomplete as exc:
            # The old token is dead on the primary, unconfirmed on the replicas: go on,
            # and say so with the new session (the caller holds its only token).
            record, taken = exc.result, exc
        if record == 0:
            raise SessionNotFound("no such session")
        assert user_id is not None
        # A login is a privilege change: the session starts a new life in the user's slot
        # (new absolute deadline), keeping its data, state and idle ttl.
        value: bytes = record[0]
        new = await self._create(
            new_tag,
            user_id,
            self._keys.encode_id(user_id),
            value[STATE.slice].decode(),
            value[HEADER_LEN:].partition(b"|")[2],
            int(value[IDLE.slice]),
            self._absolute_ms,
        )
        if taken is not None:
            raise ReplicationIncomplete(
                f"rotate: removing the old session: {taken}",
                acknowledged=taken.acknowledged,
                wanted=taken.wanted,
                result=new,
            )
        return new

    async def _rotate_in_slot(self, tag: str, old_sid: str, owner: str) -> NewSession:
        token = new_token(tag)
        sid = session_id_of(token[len(tag) + 1 :])

        def rotated(reply: Any, acked: int | None) -> NewSession:
            if reply == 0:
                raise SessionNotFound("no such session")
            session = self._session(sid, reply)
            return NewSession(token=token, session=session, replicas_acknowledged=acked)

        return await self._write(
            self._scripts["rotate"],
            tag,
            [self._keys.session(tag, old_sid), self._keys.session(tag, sid)],
            (old_sid, sid, self._keys.base(tag), owner),
            rotated,
            operation="rotate",
        )

    async def revoke(self, token: str) -> bool:
        """Delete a session. ``True`` if this call deleted a live session; never resurrects.

        After a lost reply the delete is sent once more (a delete cannot bring anything
        back): if that one deletes the session, the answer is ``True``; if it finds nothing,
        the session is certainly gone, but whether this call ended it is not known, and
        ``OutcomeUnknown`` says so rather than answering ``False``.

        Raises:
            EngineUnavailable: not confirmed; the session may still be live. Retry.
            OutcomeUnknown: the session is not live now; whether this call deleted it is
                unknown (a reply was lost).
        """
        parsed = parse_token(token)
        if parsed is None:
            return False
        tag, secret = parsed
        sid = session_id_of(secret)
        return await self._revoke(tag, sid, "")

    async def _revoke(self, tag: str, sid: str, owner: str) -> bool:
        deleted = await self._write_resending_once(
            self._scripts["revoke"],
            tag,
            [self._keys.session(tag, sid)],
            (sid, self._keys.base(tag), owner),
            lambda reply, _: bool(reply != 0),
            operation="revoke",
        )
        if deleted is None:
            raise OutcomeUnknown(
                "revoke: a reply was lost; the session is not live now, but whether this "
                "call ended it is unknown"
            )
        return deleted

    async def _write_resending_once(
        self,
        script: Script,
        tag: str,
        keys: Sequence[str],
        args: Sequence[Any],
        convert: Callable[[Any, int | None], T],
        *,
        operation: str,
        sessions: bool = True,
    ) -> T | None:
        """A delete, sent once more (within the same deadline) if its reply was lost.

        Deletes are the writes a resend cannot turn into a resurrection. Returns the first
        try's result, or ``None`` after a lost reply when the second try found nothing to
        do (the first may have done it), else the second try's result.

        A ``WAIT`` interrupted after the delete ran (the primary became a replica: a
        failover, ``UNBLOCKED``; or the connection dropped) is also resolved by a second
        try, at the slot's current owner, so a planned failover fails no revoke: that owner
        deletes again what the failover lost (a primary cut off from the majority), and
        its ``WAIT`` confirms; or it finds nothing, and then ``_fence`` confirms that what
        it holds (the first delete) reached the replicas. Either way the first try's
        result is returned.
        """
        deadline = self._write_deadline()

        def attempt() -> Awaitable[T]:
            return self._write(
                script,
                tag,
                keys,
                args,
                convert,
                operation=operation,
                deadline=deadline,
                sessions=sessions,
            )

        first: _WaitInterrupted | None = None
        try:
            return await attempt()
        except OutcomeUnknown:
            if self.transport.loop.time() >= deadline:
                raise
        except _WaitInterrupted as interrupted:
            if self.transport.loop.time() >= deadline:
                raise
            first = interrupted
        if first is None:
            again = await attempt()
            return again if again else None
        try:
            if not await attempt():
                await self._fence(tag, deadline)
        except ReplicationIncomplete as unconfirmed:
            unconfirmed.result = first.result
            raise
        return cast(T, first.result)

    async def _fence(self, tag: str, deadline: float) -> None:
        """A write that propagates and changes nothing, then ``WAIT``: proves that the
        replicas of ``tag``'s primary hold everything it held before (its replication
        offset). A read would not do: on Redis 8.2 a connection's ``WAIT`` covers only its
        own propagated writes (measured; 7.0.15 covered the whole stream).

        Raises:
            ReplicationIncomplete: fewer replicas than ``wait_replicas`` confirmed in time.
        """
        await self._write(
            self._scripts["fence"],
            tag,
            [self._keys.fence(tag)],
            (),
            lambda reply, _: reply,
            operation="fence",
            deadline=deadline,
            sessions=False,
        )

    async def revoke_session_id(self, user_id: str, session_id: str) -> bool:
        """Revoke one of ``user_id``'s sessions by its public id (a "log out that device")."""
        self._keys.check_id(user_id, "user_id")
        if not isinstance(session_id, str) or len(session_id) != 22:
            return False
        if not all(c.isalnum() or c in "-_" for c in session_id) or not session_id.isascii():
            return False
        tag = self._keys.user_tag(user_id)
        return await self._revoke(tag, session_id, self._keys.encode_id(user_id))

    async def revoke_user(self, user_id: str, except_token: str | None = None) -> int:
        """Delete every session of a user (but ``except_token``'s), atomically.

        With ``chat_owned_by_sessions`` also deletes the user's chat histories.
        Returns the number of live sessions deleted by the try that completed: while the
        user's slot is being migrated a try can stop part-way (what it deleted stays
        deleted) and the next one finishes the job, and after a lost reply the call is
        sent once more (a delete cannot resurrect), so the count may be lower.

        Raises:
            EngineUnavailable: not confirmed; sessions may still be live. Retry.
            OutcomeUnknown: a reply was lost and the second try found nothing left: every
                session is gone, but how many this call ended is unknown.
        """
        self._keys.check_id(user_id, "user_id")
        tag = self._keys.user_tag(user_id)
        keep = ""
        if except_token is not None:
            parsed = parse_token(except_token)
            if parsed is not None and parsed[0] == tag:
                keep = session_id_of(parsed[1])
        count = await self._write_resending_once(
            self._scripts["revoke_user"],
            tag,
            [self._keys.user_index(tag, user_id), self._keys.user_rooms(tag, user_id)],
            (
                self._keys.base(tag),
                keep,
                b"1" if self.settings.chat_owned_by_sessions else b"0",
                self._keys.encode_id(user_id),
            ),
            lambda reply, _: int(reply),
            operation="revoke_user",
        )
        if count is None:
            raise OutcomeUnknown(
                "revoke_user: a reply was lost; no session is left, but how many this call "
                "ended is unknown"
            )
        return count

    async def list_user_sessions(self, user_id: str) -> list[Session]:
        """The user's live sessions, oldest deadline first. One script; prunes the index."""
        self._keys.check_id(user_id, "user_id")
        tag = self._keys.user_tag(user_id)
        reply = await self._run(
            self._scripts["list_user"],
            tag,
            [self._keys.user_index(tag, user_id)],
            (self._keys.base(tag),),
            operation="list_user_sessions",
        )
        return [
            self._session(reply[i].decode(), reply[i + 1 : i + 3]) for i in range(0, len(reply), 3)
        ]

    # -- chat history -----------------------------------------------------------------

    async def chat_append(
        self, user_id: str, room_id: str, message: dict[str, Any] | BaseModel
    ) -> int:
        """Append a message to a user's chat history in a room; returns the new length.

        The history keeps the newest ``chat_max_messages`` and expires ``chat_ttl``
        seconds after the last append. Not sent again after a lost reply (it could append
        twice): ``OutcomeUnknown`` instead. WAITed like every write under ``wait_replicas``.

        Raises:
            SessionNotFound: ``chat_owned_by_sessions`` is set and the user has no live
                session.
            ChatRoomLimitExceeded: the room is new and the user has
                ``chat_max_rooms_per_user`` rooms (rooms cleared or expired do not count).
        """
        self._keys.check_id(user_id, "user_id")
        self._keys.check_id(room_id, "room_id")
        raw = encode_data(message, self.settings.chat_max_message_bytes, "message")
        tag = self._keys.user_tag(user_id)

        def appended(reply: Any, _: int | None) -> int:
            if reply == -1:
                raise SessionNotFound("the user has no live session")
            if reply == -2:
                raise ChatRoomLimitExceeded(
                    f"the user has {self.settings.chat_max_rooms_per_user} chat rooms already"
                )
            return int(reply)

        return await self._write(
            self._scripts["chat_append"],
            tag,
            [
                self._keys.chat(tag, user_id, room_id),
                self._keys.user_rooms(tag, user_id),
                self._keys.user_index(tag, user_id),
            ],
            (
                raw,
                self.settings.chat_max_messages,
                self._chat_ttl_ms,
                self._keys.encode_id(room_id),
                b"1" if self.settings.chat_owned_by_sessions else b"0",
                self._keys.base(tag),
                self.settings.chat_max_rooms_per_user,
                self._keys.encode_id(user_id),
            ),
            appended,
            operation="chat_append",
            sessions=False,
        )

    async def chat_history(self, user_id: str, room_id: str, limit: int = 50) -> list[Any]:
        """The newest ``limit`` messages, oldest first."""
        self._keys.check_id(user_id, "user_id")
        self._keys.check_id(room_id, "room_id")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidArgument("limit must be a positive int")
        limit = min(limit, self.settings.chat_max_messages)
        tag = self._keys.user_tag(user_id)
        key = self._keys.chat(tag, user_id, room_id)
        reply = await self._command(tag, pack(("LRANGE", key, -limit, -1)), "chat_history")
        return [orjson.loads(m) for m in reply]

    async def chat_clear(self, user_id: str, room_id: str) -> None:
        """Delete one chat history (its room no longer counts against the room limit)."""
        self._keys.check_id(user_id, "user_id")
        self._keys.check_id(room_id, "room_id")
        tag = self._keys.user_tag(user_id)
        await self._write_resending_once(
            self._scripts["chat_clear"],
            tag,
            [self._keys.chat(tag, user_id, room_id), self._keys.user_rooms(tag, user_id)],
            (self._keys.encode_id(room_id),),
            lambda reply, _: None,
            operation="chat_clear",
            sessions=False,
        )

    # -- events -----------------------------------------------------------------------

    def events(
        self, *, check: bool = True, resolve_users: bool = True, max_queue: int = 10_000
    ) -> SessionEventStream:
        """Session events (created, rotated, revoked, expired, evicted) from every primary.

        ``async with engine.events() as events: async for event in events: ...``.
        Delivery is at most once (Redis pub/sub): events published while a primary fails
        over, or while the queue is full, are lost. Needs ``notify-keyspace-events`` to
        include ``Kg$xe`` on every node (checked at start unless ``check=False``). Details
        in ``engine/_events.py``.

        Args:
            check: Read ``notify-keyspace-events`` on each primary first and raise
                ``EventsUnavailable`` naming the missing flags.
            resolve_users: Read the owner of created and rotated sessions (one GET each).
            max_queue: Events held for a slow consumer; past it they are dropped (counted
                in the stream's ``dropped``).
        """
        from ._events import SessionEventStream  # noqa: PLC0415 - only for users of events

        return SessionEventStream(
            self, check=check, resolve_users=resolve_users, max_queue=max_queue
        )

    # -- health and stats -------------------------------------------------------------

    async def ping(self) -> int:
        """PING every primary at once (for health checks); returns how many answered.

        Raises:
            EngineUnavailable: a primary did not answer in time, so some sessions cannot
                be checked right now.
        """
        t = self.transport
        primaries = t.primaries()
        await asyncio.gather(*(t.call_node(node, "PING") for node in primaries))
        return len(primaries)

    async def stats(self) -> EngineStats:
        """Counters of this engine, latency percentiles, and the cluster's size.

        ``active_sessions`` is exact when a primary holds at most ``2 x stats_samples``
        keys (counted with SCAN) and estimated from ``stats_samples`` RANDOMKEY samples
        times DBSIZE otherwise, so its cost does not grow with the keyspace.
        """
        m = self._metrics
        p50, p99 = m.percentiles(50, 99)
        primaries = self.transport.primaries()
        results = await asyncio.gather(*(self._node_stats(n) for n in primaries))
        memory = {n.name: mem for n, (_, mem) in zip(primaries, results, strict=True)}
        return EngineStats(
            validations=m.validations,
            hits=m.hits,
            misses=MissReasons(
                unknown=m.miss_unknown,
                expired=m.miss_expired,
                state=m.miss_state,
                malformed=m.miss_malformed,
            ),
            hit_rate=(m.hits / m.validations) if m.validations else 0.0,
            errors=m.errors,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            active_sessions=sum(count for count, _ in results),
            used_memory_bytes=memory,
            primaries=len(primaries),
            mode="cluster" if self.transport.cluster else "standalone",
            **(self._cache.snapshot() if self._cache is not None else {}),
        )

    async def _node_stats(self, node: Any) -> tuple[int, int]:
        t = self.transport
        info = await t.call_node(node, "INFO", "memory")
        memory = 0
        for line in info.split(b"\r\n"):
            if line.startswith(b"used_memory:"):
                memory = int(line.split(b":", 1)[1])
                break
        size = int(await t.call_node(node, "DBSIZE"))
        samples = self.settings.stats_samples
        if size == 0:
            return 0, memory
        if size <= 2 * samples:
            count, cursor = 0, b"0"
            pattern = self._keys.session_pattern()
            while True:
                cursor, keys = await t.call_node(
                    node, "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, "TYPE", "string"
                )
                count += len(keys)
                if cursor == b"0":
                    return count, memory
        replies = await t.call_node_many(node, [("RANDOMKEY",)] * samples)
        keys = [k for k in replies if isinstance(k, bytes)]
        if not keys:
            return 0, memory
        is_session = self._keys.is_session_key
        hits = sum(1 for k in keys if is_session(k))
        return round(size * hits / len(keys)), memory
