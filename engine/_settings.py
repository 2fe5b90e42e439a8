"""Engine settings: frozen, typed, read from ``ENGINE_*`` environment variables."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "MAX_TTL",
    "MIN_TTL",
    "EngineSettings",
    "RedisURL",
    "parse_seeds",
    "parse_url",
    "redact_url",
]

MAX_TTL = 10 * 365 * 86400.0
"""Ten years, in seconds: the longest idle or absolute TTL a session can have."""
MIN_TTL = 1.0
"""One second: the shortest TTL anything is given. Shorter ones round to nothing in the
millisecond fields Redis is given, and are always a mistake for a session."""
MIN_TIMEOUT = 0.001
"""Timeouts are sent to Redis in whole milliseconds (``WAIT n ms``), where 0 means forever."""


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of them) with everything between ``://`` and the
    last ``@`` replaced by ``***`` (for reprs, logs and error texts).

    Deliberately cruder than a URL parser: a password may hold an unencoded ``#``, ``?``
    or ``/`` that a parser would take for the start of a fragment, query or path, and
    show. Over-redacting an odd URL costs nothing; showing a password does.
    """
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _, at, host = rest.rpartition("@")
    if not at:
        return url
    # The user name goes too: `redis://hunter2@host` (a password without its colon) is a
    # common slip, and a URL parser reads it as a user name.
    return f"{scheme}{sep}***@{host}"


def parse_seeds(url: str) -> list[RedisURL]:
    """Several seeds, comma-separated (``redis://a:7000,redis://b:7000``), each parsed by
    ``parse_url``: the engine starts from the first that answers. They must agree on TLS.

    Raises:
        ValueError: one does not parse, or they mix ``redis://`` and ``rediss://``.
    """
    seeds = [parse_url(part.strip()) for part in url.split(",")]
    if len({seed.tls for seed in seeds}) > 1:
        raise ValueError("the seeds mix redis:// and rediss://")
    return seeds


class RedisURL(NamedTuple):
    """The parts of a ``redis://`` / ``rediss://`` URL the engine uses."""

    tls: bool
    host: str
    port: int
    username: str | None
    password: str | None
    db: int


def parse_url(url: str) -> RedisURL:
    """Parse a Redis URL strictly: ``redis[s]://[user[:password]@]host[:port][/db]``.

    No part is guessed: a URL without a scheme or a host is refused rather than read as
    127.0.0.1:6379 (which would send the engine to whatever listens there).

    Raises:
        ValueError: with a message that never contains the password.
    """
    try:
        url.encode("utf-8")  # a lone surrogate would only fail when sent (in AUTH)
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except (ValueError, UnicodeError):
        raise ValueError(f"not a valid Redis URL: {redact_url(url)!r}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("the URL must start with redis:// or rediss://")
    if not host:
        raise ValueError("the URL names no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the URL's path must be a database number")
    return RedisURL(
        tls=parts.scheme == "rediss",
        host=host,
        port=port or 6379,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=int(path or 0),
    )


class EngineSettings(BaseSettings):
    """Everything the engine can be told, with production defaults.

    ``EngineSettings()`` alone reads ``ENGINE_URL``, ``ENGINE_IDLE_TTL`` and so on from the
    environment. Instances are frozen: build a new one with ``model_copy(update=...)``.
    Durations are seconds (floats allowed); the engine works in milliseconds inside.
    """

    # hide_input_in_errors: a validation error must not echo the URL (and its password).
    model_config = SettingsConfigDict(
        env_prefix="ENGINE_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    url: str = Field(
        default="redis://127.0.0.1:6379",
        description=(
            "A node of the cluster (or the single server); several, comma-separated, and "
            "the engine starts from the first that answers. Cluster mode is detected."
        ),
    )
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = Field(
        default=None,
        description=(
            "A file holding the password (one line), read at open and again at every "
            "reconnect once it changed: a rotated password needs no restart. Not with "
            "password."
        ),
    )

    tls_ca_file: str | None = Field(
        default=None,
        description="CA bundle for rediss:// (default: the system's CAs). The tls_* files "
        "are read again at a reconnect once they changed: rotation needs no restart.",
    )
    tls_cert_file: str | None = Field(default=None, description="Client certificate (mTLS).")
    tls_key_file: str | None = Field(default=None, description="Client key (mTLS).")
    tls_verify_hostname: bool = Field(
        default=True,
        description="Check the server certificate names the host connected to. Turn off "
        "only for clusters that announce IPs their certificates do not carry.",
    )

    # At most ten years: the stored layout has fixed-width millisecond fields (see
    # lua/_prelude.lua), and create(idle_ttl=..., absolute_ttl=...) is held to the same cap.
    idle_ttl: float = Field(
        default=1800.0, ge=MIN_TTL, le=MAX_TTL, description="Sliding idle timeout (>= 1 s)."
    )
    absolute_ttl: float = Field(
        default=86400.0, ge=MIN_TTL, le=MAX_TTL, description="Hard lifetime cap (>= idle_ttl)."
    )
    refresh_slack: float = Field(
        default=0.05,
        ge=0,
        le=0.1,
        description=(
            "Lazy refresh: validate rewrites the TTL only once it has fallen more than this "
            "fraction of idle_ttl below idle_ttl, so most validations write (and replicate) "
            "nothing. At most 0.1, so a validated session stays valid >= 0.9 x idle_ttl."
        ),
    )

    max_sessions_per_user: int = Field(default=100, ge=1, le=100_000)
    session_limit_policy: Literal["evict_oldest", "refuse"] = "evict_oldest"
    max_payload_bytes: int = Field(default=16384, ge=2, le=64 * 1024 * 1024)
    max_id_bytes: int = Field(default=256, ge=1, le=4096, description="User and room ids.")

    chat_max_messages: int = Field(default=200, ge=1, le=1_000_000)
    chat_max_message_bytes: int = Field(default=4096, ge=2, le=16 * 1024 * 1024)
    chat_ttl: float = Field(default=7 * 86400.0, ge=MIN_TTL, le=MAX_TTL)
    chat_max_rooms_per_user: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description=(
            "Chat rooms one user may have; chat_append to a new room past it raises "
            "ChatRoomLimitExceeded. Bounds what revoke_user does in one script."
        ),
    )
    chat_owned_by_sessions: bool = Field(
        default=False,
        description=(
            "revoke_user also deletes the user's chat histories, and chat_append refuses "
            "when the user has no live session (so a revoked user's chat keys are never "
            "recreated)."
        ),
    )

    key_prefix: str = Field(
        default="se", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"
    )
    tag_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Key for the user-id -> routing tag hash. Set it so nobody can pick user ids that "
            "all land in one hash slot. Changing it orphans existing sessions."
        ),
    )

    command_timeout: float = Field(
        default=1.0,
        ge=MIN_TIMEOUT,
        le=3600,
        description="One deadline per call, covering all its retries.",
    )
    connect_timeout: float = Field(default=1.0, ge=MIN_TIMEOUT, le=3600)
    bulk_batch: int = Field(
        default=5_000, ge=1, description="validate_many sends at most this many per deadline."
    )
    max_inflight_per_node: int = Field(
        default=20_000, ge=16, description="Back-pressure: commands awaiting replies per node."
    )
    breaker_failures: int = Field(
        default=3,
        ge=1,
        description="Consecutive connection failures or timeouts that open a node's breaker.",
    )
    breaker_reset: float = Field(
        default=0.25, gt=0, description="First half-open probe delay; doubles up to 2 s."
    )

    wait_replicas: int = Field(
        default=0,
        ge=0,
        description=(
            "Every write (create, rotate, update, revoke, revoke_user, chat_append, "
            "chat_clear) is followed by WAIT n on a per-node connection of its own."
        ),
    )
    wait_timeout: float = Field(default=0.5, ge=MIN_TIMEOUT, le=3600)

    replica_fallback_after: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description=(
            "Opt-in: when a primary has not answered a validate within this many seconds "
            "(or cannot be reached), ask a replica of its slots (READONLY, read-only, no "
            "refresh) instead of failing. Safe only with wait_replicas covering every "
            "replica of a shard: see README 'Replica fallback'. None (default): off."
        ),
    )

    local_cache_size: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description=(
            "Sessions kept in this process after a validation (0: off). A hit answers "
            "validate without Redis; every change anywhere drops it (server-assisted "
            "invalidation, CLIENT TRACKING). About 1-2 KiB per entry: see bench.md."
        ),
    )
    local_cache_max_staleness: float = Field(
        default=0.5,
        ge=0.05,
        le=60,
        description=(
            "The longest a change made elsewhere may go unseen by this process's local "
            "cache in any failure (lost messages, a paused or cut-off node): a node's "
            "entries are served only this long after its last answered liveness probe "
            "(sent every quarter of it)."
        ),
    )

    token_memo_size: int = Field(
        default=65_536,
        ge=0,
        description="Tokens whose slot and key are memoised (parsing + SHA-256 skipped).",
    )
    latency_window: int = Field(
        default=10_000, ge=100, le=1_000_000, description="Calls kept for p50/p99."
    )
    stats_samples: int = Field(
        default=1024, ge=64, description="RANDOMKEY samples per primary for active_sessions."
    )

    @field_validator("url")
    @classmethod
    def _url_parses(cls, url: str) -> str:
        parse_seeds(url)
        return url

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # The URL may carry a password (redis://user:secret@host): never show it.
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "url" else value)

    @model_validator(mode="after")
    def _one_password_source(self) -> EngineSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        return self

    @model_validator(mode="after")
    def _absolute_covers_idle(self) -> EngineSettings:
        if self.absolute_ttl < self.idle_ttl:
            raise ValueError("absolute_ttl must be >= idle_ttl")
        return self
