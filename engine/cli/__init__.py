"""The tools: ``python -m engine COMMAND``, one argparse parser with a subcommand each.

Each command lives in a module of this package with ``configure(parser)`` (its arguments)
and ``execute(args) -> int``. Only the chosen command's module is imported, so
``python -m engine cluster down`` does not pay for Locust's or the benchmark's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["CHECKOUT", "COMMANDS", "main"]

CHECKOUT = Path(__file__).resolve().parents[2]
"""The repository checkout the tools run from (loadtest/, docker/ live there)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("engine.cli.demo", "the engine on a local six-node cluster, in about a minute"),
    "bench": (
        "engine.cli.bench",
        "throughput/latency against redis-py and redis-benchmark (--http: the FastAPI path "
        "beside its peers under wrk; --tls: TLS against plaintext; --local-cache: the local "
        "cache's hits, revocation delay and memory)",
    ),
    "cluster": ("engine.cli.cluster", "up|down|status: a local cluster in the background"),
    "loadtest": ("engine.cli.loadtest", "reference FastAPI service under headless Locust"),
    "drill": ("engine.cli.drill", "SCENARIO: a failover drill under load (kill-primary, ...)"),
    "acl": (
        "engine.cli.acl",
        "the ACL SETUSER rule of a least-privilege engine user (--prefix, --features)",
    ),
    "fuzz": ("engine.cli.fuzz", "TARGET: coverage-guided fuzzing of the public entries (atheris)"),
    "sessions": ("engine.cli.sessions", "list|revoke --user U: see or end a user's sessions"),
}
_EXTRAS = "pip install 'redis-session-engine[testing,fastapi,loadtest,charts,cli]'"


def _version() -> str:
    try:
        return version("redis-session-engine")
    except PackageNotFoundError:  # a checkout that is not installed
        from .. import __version__  # noqa: PLC0415

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Tools of the session engine: demo, benchmarks, drills, load tests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in args_in if not a.startswith("-")), None)
    for name, (home, text) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        if name != chosen:
            continue
        module_name = home
        if name == "bench" and "--http" in args_in:
            module_name = "engine.cli.httpbench"  # its own arguments, behind --http
            sub.add_argument("--http", action="store_true", help="the HTTP benchmark")
        elif name == "bench" and "--local-cache" in args_in:
            module_name = "engine.cli.cachebench"  # the local cache's targets (issue 12)
            sub.add_argument("--local-cache", action="store_true", help="the local cache bench")
        elif name == "bench" and "--tls" in args_in:
            module_name = "engine.cli.tlsbench"  # TLS vs plaintext, behind --tls
            sub.add_argument("--tls", action="store_true", help="the TLS cost benchmark")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # the tools' extras are not installed
            print(f"python -m engine {name} needs {exc.name!r}: {_EXTRAS}", file=sys.stderr)
            return 2
        module.configure(sub)
        sub.set_defaults(execute=module.execute)
    args = parser.parse_args(args_in)
    args.argv = args_in
    code: int = args.execute(args)
    return code
