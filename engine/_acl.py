"""The least-privilege ACL user the engine needs, per feature: one table, read by the code's
tests and by ``python -m engine acl``, so what the tool prints is what the engine sends.

A feature lists the commands the engine sends on the wire for it and the Lua scripts it
runs: Redis checks every ``redis.call`` inside a script against the caller's ACL too, so
the commands of those scripts are read from the ``lua/`` sources themselves, never listed
by hand. Keys are limited to the key prefix (``~<prefix>:*``); pub/sub channels are given
only to the features that subscribe.

Adding a feature is one entry in ``FEATURES``.

ACL users are per node (Redis Cluster does not propagate ``ACL SETUSER``): run the rule on
every node, replicas included (a replica is promoted with the ACL it already has).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._events import keyspace_pattern
from ._scripts import SCRIPT_NAMES, scripts

__all__ = [
    "BASE",
    "DEFAULT_FEATURES",
    "FEATURES",
    "Feature",
    "Permissions",
    "acl_setuser_args",
    "denied_script_command",
    "format_acl_setuser",
    "permissions",
    "script_commands",
]


@dataclass(frozen=True, slots=True)
class Feature:
    """What one feature of the engine sends.

    Attributes:
        name: The name ``python -m engine acl --features`` takes.
        description: One line for ``--help`` and the README.
        commands: Commands sent on the wire, in ACL syntax (``cluster|slots`` for one
            subcommand), lower case.
        scripts: Lua scripts it runs with EVALSHA (their ``redis.call`` commands count).
        channels: Pub/sub channels it subscribes to.
    """

    name: str
    description: str
    commands: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()


BASE = Feature(
    "base",
    "always: handshake PING, slot map, script loading and running, ASK redirects",
    commands=(
        "ping",  # the connect handshake (AUTH needs no permission)
        "cluster|slots",  # discovery and every slot-map refresh
        "script|load",  # every primary, at start and after a failover or SCRIPT FLUSH
        "evalsha",  # every operation is one script
        "eval",  # the NOSCRIPT fallback: the same script with its source, once
        "asking",  # sent before a command redirected by ASK during a slot migration
    ),
)

_PREFIXED_KEYSPACE = "<keyspace-of-prefix>"  # replaced by keyspace_pattern(prefix)

FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "sessions",
            "create, validate, validate_many, update, rotate, revoke, revoke_user, "
            "list_user, ping, stats",
            commands=("info", "dbsize", "scan", "randomkey"),  # stats(): INFO memory, sizes
            # Every script but the chat ones (tests/test_acl.py: each belongs to a feature).
            scripts=tuple(n for n in SCRIPT_NAMES if not n.startswith("chat_")),
        ),
        Feature(
            "chat",
            "chat_append, chat_history, chat_clear",
            commands=("lrange",),  # chat_history reads without a script
            scripts=("chat_append", "chat_clear"),
        ),
        Feature(
            "wait_replicas",
            "durable writes: WAIT after every write (setting wait_replicas > 0)",
            commands=("wait",),
        ),
        Feature(
            "local_cache",
            "the local cache: CLIENT TRACKING redirected to a per-node invalidation "
            "subscriber, pinged for liveness",
            commands=(
                "client|id",
                "client|tracking",
                "client|caching",
                "cluster|info",
                "subscribe",
                "ping",
            ),
            channels=("__redis__:invalidate",),
        ),
        Feature(
            "events",
            "engine.events(): keyspace notifications of session keys, on every primary "
            "(checks notify-keyspace-events; GET resolves the owner of a new session)",
            commands=("psubscribe", "config|get", "get"),
            channels=(_PREFIXED_KEYSPACE,),
        ),
        Feature(
            "replica_fallback",
            "replica_fallback_after: validations read from a replica (READONLY, EVAL_RO) "
            "while the primary does not answer",
            commands=("readonly", "eval_ro"),
        ),
        Feature(
            "select_db",
            "a single server with a database number in the URL (redis://host/2): SELECT",
            commands=("select",),
        ),
    )
}

DEFAULT_FEATURES: tuple[str, ...] = ("sessions", "chat")
"""What ``python -m engine acl`` grants when no ``--features`` are given."""

_CALL = re.compile(rb"""redis\.p?call\(\s*['"]([A-Za-z]+)['"]""")
_ANY_CALL = re.compile(rb"redis\.p?call\(")


def script_commands(name: str) -> tuple[str, ...]:
    """The commands script ``name`` may call (its prelude included), lower case, sorted.

    Raises:
        ValueError: A ``redis.call`` whose command is not a string literal: its permission
            could not be known from the source.
    """
    source = scripts()[name].source
    found = _CALL.findall(source)
    if len(found) != len(_ANY_CALL.findall(source)):
        raise ValueError(f"script {name} calls a command that is not a string literal")
    return tuple(sorted({c.decode().lower() for c in found}))


def denied_script_command(sha: str, line: int) -> str | None:
    """The command on ``line`` of the script with SHA1 ``sha`` (how Redis 7.0 reports a
    command refused inside a script), or ``None`` if that is not one of ours."""
    for script in scripts().values():
        if script.sha.decode() == sha:
            lines = script.source.splitlines()
            if 1 <= line <= len(lines):
                found = _CALL.search(lines[line - 1])
                return found.group(1).decode().lower() if found else None
    return None


@dataclass(frozen=True, slots=True)
class Permissions:
    """Everything an ACL user needs for a set of features."""

    commands: tuple[str, ...]
    key_patterns: tuple[str, ...]
    channels: tuple[str, ...]


def _features(names: Iterable[str]) -> list[Feature]:
    chosen = [BASE]
    for name in names:
        feature = FEATURES.get(name)
        if feature is None:
            known = ", ".join(FEATURES)
            raise ValueError(f"unknown feature {name!r}; known: {known}")
        chosen.append(feature)
    return chosen


def permissions(prefix: str, features: Iterable[str] = DEFAULT_FEATURES) -> Permissions:
    """The commands, key patterns and channels the engine needs for ``features``.

    Raises:
        ValueError: An unknown feature name.
    """
    commands: set[str] = set()
    channels: set[str] = set()
    for feature in _features(features):
        commands.update(feature.commands)
        channels.update(
            keyspace_pattern(prefix) if c == _PREFIXED_KEYSPACE else c for c in feature.channels
        )
        for script in feature.scripts:
            commands.update(script_commands(script))
    return Permissions(
        commands=tuple(sorted(commands)),
        key_patterns=(f"{prefix}:*",),
        channels=tuple(sorted(channels)),
    )


def acl_setuser_args(
    user: str,
    prefix: str,
    features: Iterable[str] = DEFAULT_FEATURES,
    *,
    password: str | None = None,
) -> list[str]:
    """The arguments of ``ACL SETUSER`` (after the command itself) for the engine's user.

    ``reset`` first, so running it again (or on a user that had more) leaves exactly this.
    Without ``password`` the rule holds the placeholder ``><password>`` to replace.
    """
    perms = permissions(prefix, features)
    return [
        user,
        "reset",
        "on",
        f">{password}" if password is not None else "><password>",
        *(f"~{pattern}" for pattern in perms.key_patterns),
        "resetchannels",
        *(f"&{channel}" for channel in perms.channels),
        "-@all",
        *(f"+{command}" for command in perms.commands),
    ]


def format_acl_setuser(user: str, prefix: str, features: Sequence[str] = DEFAULT_FEATURES) -> str:
    """The ``ACL SETUSER`` line an operator runs on every node (password as a placeholder)."""
    return "ACL SETUSER " + " ".join(acl_setuser_args(user, prefix, features))
