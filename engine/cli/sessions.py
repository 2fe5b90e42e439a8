"""``python -m engine sessions list|revoke --user U``: see and end a user's sessions.

The command-line twin of ``engine.fastapi.admin_router``: it talks to Redis directly with
a ``SessionEngine``, so it needs the same settings as the service (``--url`` and
``--prefix``, or the service's ``ENGINE_*`` variables, ``ENGINE_TAG_SECRET`` included: a
user's sessions are found through the tag derived from the user id). It never shows a
token or a session's data.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Final

from .. import EngineError, EngineSettings, InvalidArgument, SessionEngine
from .._session_info import SessionInfo
from .console import add_json_option, print_table, report_stream, write_json

__all__ = ["configure", "execute"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "revoke"))
    parser.add_argument("--user", required=True, help="the user id (required)")
    parser.add_argument(
        "--session",
        default=None,
        help="revoke: only this session id (default: every session of the user)",
    )
    parser.add_argument("--url", default=None, help="cluster URL (default: ENGINE_URL)")
    parser.add_argument("--prefix", default=None, help="key prefix (default: ENGINE_KEY_PREFIX)")
    add_json_option(parser, "the sessions (revoke: how many were revoked)")


def _settings(args: argparse.Namespace) -> EngineSettings:
    fields: dict[str, Any] = {}
    if args.url:
        fields["url"] = args.url
    if args.prefix:
        fields["key_prefix"] = args.prefix
    return EngineSettings(**fields)


COLUMNS: Final = ("SESSION ID", "STATE", "CREATED", "IDLE DEADLINE", "ABSOLUTE DEADLINE")


def _rows(rows: list[SessionInfo]) -> list[list[str | None]]:
    return [
        [
            r.session_id,
            r.state.value,
            r.created_at.isoformat(timespec="seconds"),
            r.idle_expires_at.isoformat(timespec="seconds"),
            r.absolute_expires_at.isoformat(timespec="seconds"),
        ]
        for r in rows
    ]


async def _run(args: argparse.Namespace) -> int:
    out = report_stream(args)
    async with SessionEngine(_settings(args)) as engine:
        if args.action == "list":
            rows = [SessionInfo.of(s) for s in await engine.list_user_sessions(args.user)]
            if rows:
                print_table(f"sessions of user {args.user!r}", COLUMNS, _rows(rows), file=out)
            else:
                print(f"no live session for user {args.user!r}", file=out)
            write_json(args.json, [r.model_dump(mode="json") for r in rows])
            return 0
        if args.session is not None:
            count = int(await engine.revoke_session_id(args.user, args.session))
        else:
            count = await engine.revoke_user(args.user)
        print(f"revoked {count} session(s) of user {args.user!r}", file=out)
        write_json(args.json, {"revoked": count})
        return 0 if count or args.session is None else 1


def execute(args: argparse.Namespace) -> int:
    if args.session is not None and args.action != "revoke":
        print("error: --session goes with revoke", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (InvalidArgument, ValueError) as exc:  # settings or ids refused, before any I/O
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
