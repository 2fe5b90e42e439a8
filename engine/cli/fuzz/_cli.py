"""``python -m engine fuzz``: each target in a child process that atheris instruments."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..._settings import EngineSettings
from ._core import TAG_SECRET, BytesSource, Source
from ._http import HttpApp, check_http
from ._targets import (
    JailLoop,
    RedisContext,
    check_chat,
    check_create_args,
    check_ids,
    check_settings,
    check_token,
    check_url,
    engine_fields,
)

# -- command line ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    redis: bool
    text: str


TARGETS: Final = {
    "token": Target(False, "parse_token and every entry taking a token, any object"),
    "data": Target(False, "create/update arguments: data, ids, state, TTLs, versions"),
    "settings": Target(False, "EngineSettings from kwargs and ENGINE_* variables"),
    "url": Target(False, "Redis URLs with passwords: EngineSettings(url=...) and open()"),
    "http": Target(False, "engine.fastapi dependencies with any Authorization/Cookie bytes"),
    "ids": Target(True, "user/room ids and session data through every entry, round-tripped"),
    "chat": Target(True, "chat_append messages, owned-by-sessions refusals"),
}

# The child process: instrument the engine's modules (not this one) before importing them.
# This package is left out: only the engine's own code should steer the fuzzer.
_FUZZ_MODULES: Final = ["engine.cli.fuzz"] + [
    f"engine.cli.fuzz.{m}" for m in ("_cli", "_core", "_gen", "_http", "_targets")
]
_WORKER: Final = f"""\
import sys
import atheris
with atheris.instrument_imports(include=["engine"], exclude={_FUZZ_MODULES!r}):
    import engine
    try:
        import engine.fastapi
    except ImportError:
        pass
from engine.cli.fuzz._cli import worker
sys.exit(worker(sys.argv[1:]))
"""


def _scan(clients: list[Any], prefixes: Sequence[str]) -> list[bytes]:
    return [
        key
        for client in clients
        for prefix in prefixes
        for key in client.scan_iter(match=f"{prefix}:*", count=1000)
    ]


def delete_prefixes(url: str, prefixes: Sequence[str]) -> int:
    """Delete every key under the prefixes on every primary; returns how many."""
    from ...testing import delete_prefix  # noqa: PLC0415 (only the Redis targets need it)

    return sum(delete_prefix(url, p) for p in prefixes)


def _setup(target: str, url: str | None, prefix: str) -> Callable[[bytes], None]:
    """Build the target's state once and return libFuzzer's ``TestOneInput``."""
    atheris: Any = importlib.import_module("atheris")
    from ..._engine import SessionEngine  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    run = loop.run_until_complete

    def source(data: bytes) -> Source:
        return BytesSource(atheris.FuzzedDataProvider(data))

    if target == "token":
        idle = SessionEngine(EngineSettings(tag_secret=TAG_SECRET))
        return lambda data: run(check_token(idle, source(data), live=False))
    if target == "data":
        idle = SessionEngine(EngineSettings(**engine_fields()))
        return lambda data: run(check_create_args(idle, source(data)))
    if target == "settings":
        return lambda data: check_settings(source(data))
    if target == "url":
        jail = JailLoop()
        return lambda data: jail.run_until_complete(check_url(source(data), jail))
    if target == "http":
        http = HttpApp()
        run(http.start())
        return lambda data: run(check_http(http, source(data)))
    assert url is not None
    fields = engine_fields()
    eng = run(SessionEngine(EngineSettings(url=url, key_prefix=prefix, **fields)).open())
    owned = run(
        SessionEngine(
            EngineSettings(url=url, key_prefix=f"{prefix}o", chat_owned_by_sessions=True, **fields)
        ).open()
    )
    from ...testing import primary_clients  # noqa: PLC0415 (only the Redis targets need it)

    clients: list[Any] = primary_clients(url)
    prefixes = (prefix, f"{prefix}o")

    async def keys() -> list[bytes]:
        return _scan(clients, prefixes)

    async def clear() -> None:
        for client in clients:
            for key in _scan([client], prefixes):
                client.unlink(key)

    ctx = RedisContext(engine=eng, owned=owned, keys=keys, clear=clear)
    check = check_ids if target == "ids" else check_chat
    return lambda data: run(check(ctx, source(data)))


def worker(argv: list[str]) -> int:
    """The child: ``TARGET [--url URL --prefix P] -- libFuzzer arguments``."""
    parser = argparse.ArgumentParser(prog="engine.cli.fuzz worker")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--url")
    parser.add_argument("--prefix", default="fuzz")
    args, libfuzzer = parser.parse_known_args(argv)
    atheris: Any = importlib.import_module("atheris")
    test_one_input = _setup(args.target, args.url, args.prefix)
    atheris.Setup([sys.argv[0], *[a for a in libfuzzer if a != "--"]], test_one_input)
    atheris.Fuzz()  # libFuzzer exits the process: 0 when the time is up, non-zero on a failure
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine fuzz``; the targets listed in its help."""
    targets = "\n".join(
        f"  {name:<9}{'(Redis) ' if t.redis else ''}{t.text}" for name, t in TARGETS.items()
    )
    parser.description = (
        "Coverage-guided fuzzing (atheris/libFuzzer) of the engine's public entries: each "
        "input must get a clear engine error or a correct result, never another exception, "
        "never a write after a refusal, never a secret in an error."
    )
    parser.epilog = f"targets:\n{targets}\n  all      every target in turn"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, default=10, help="per target (default 10)")
    parser.add_argument("--runs", type=int, help="stop after this many inputs instead")
    parser.add_argument("--url", help="a cluster for the Redis targets (default: start one)")
    parser.add_argument(
        "--artifacts", help="where failing inputs are written (default: a temporary directory)"
    )
    parser.add_argument("--reproduce", metavar="FILE", help="run one saved input and stop")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine fuzz TARGET [--seconds N]`` from Python."""
    from .. import main as cli_main  # noqa: PLC0415 - the one parser

    return cli_main(["fuzz", *(sys.argv[2:] if argv is None else argv)])


def execute(args: argparse.Namespace) -> int:
    """Run the chosen targets, each in an instrumented child process."""
    if importlib.util.find_spec("atheris") is None:
        print("atheris is not installed: pip install 'redis-session-engine[dev]'", file=sys.stderr)
        return 2
    names = list(TARGETS) if args.target == "all" else [args.target]
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="engine-fuzz-")
    os.makedirs(artifacts, exist_ok=True)
    libfuzzer = [f"-artifact_prefix={os.path.join(artifacts, '')}", "-timeout=60"]
    if args.seed is not None:
        libfuzzer.append(f"-seed={args.seed}")
    if args.reproduce:
        libfuzzer.append(args.reproduce)
    elif args.runs is not None:
        libfuzzer.append(f"-runs={args.runs}")
    else:
        libfuzzer.append(f"-max_total_time={args.seconds}")
    # A worker that outlives its time by minutes hangs (libFuzzer ends it on time).
    limit = None if args.runs is not None else args.seconds + 300
    failed: list[str] = []
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None and any(TARGETS[n].redis for n in names):
            from ...testing import LocalCluster  # noqa: PLC0415

            url = stack.enter_context(LocalCluster(primaries=3, replicas_per_primary=0)).url
        for name in names:
            prefix = f"fz{os.urandom(4).hex()}"
            command = [sys.executable, "-c", _WORKER, name]
            if TARGETS[name].redis:
                command += ["--url", str(url), "--prefix", prefix]
            print(f"== fuzz {name} ==", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                code = subprocess.run(
                    [*command, "--", *libfuzzer], check=False, timeout=limit
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
            finally:
                if TARGETS[name].redis and url is not None:
                    with contextlib.suppress(Exception):
                        delete_prefixes(str(url), [prefix, f"{prefix}o"])
            took = time.monotonic() - t0
            verdict = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"== fuzz {name}: {verdict} in {took:.1f} s ==", file=sys.stderr, flush=True)
            if code != 0:
                failed.append(name)
    if failed:
        print(
            f"invariant broken in: {', '.join(failed)}; failing inputs in {artifacts} "
            f"(rerun one with: python -m engine fuzz TARGET --reproduce FILE)",
            file=sys.stderr,
        )
        return 1
    if not args.artifacts:
        shutil.rmtree(artifacts, ignore_errors=True)
    return 0
