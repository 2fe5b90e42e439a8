"""Command line entry point: ``python -m engine <command> ...``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine._loadtest import main as loadtest_main
from engine.cluster import main as cluster_main

_USAGE = """usage: python -m engine COMMAND [options]

commands:
  demo                    the engine on a local six-node cluster, in about a minute
  bench                   throughput/latency against redis-py and redis-benchmark
  cluster up|down|status  a local cluster in the background for development
  loadtest                reference FastAPI service under headless Locust
  drill SCENARIO          a failover drill under load (kill-primary, takeover, ...)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``python -m engine <command>`` to the module that implements it.

    Args:
        argv: Arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["cluster"]:
        return cluster_main(args[1:])
    if args[:1] == ["loadtest"]:
        return loadtest_main(args[1:])
    if args[:1] == ["demo"]:
        from engine._demo import main as demo_main  # noqa: PLC0415 - keep start-up light

        return demo_main(args[1:])
    if args[:1] == ["drill"]:
        from engine._drill import main as drill_main  # noqa: PLC0415

        return drill_main(args[1:])
    if args[:1] == ["bench"]:
        from engine._bench import main as bench_main  # noqa: PLC0415

        return bench_main(args[1:])
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
