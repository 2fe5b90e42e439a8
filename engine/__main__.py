"""Command line entry point: ``python -m engine <command> ...``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# Each command is the ``main(argv) -> int`` of one module, imported only when used so
# `python -m engine cluster down` does not pay for the benchmark's or Locust's imports.
_COMMANDS = {
    "demo": ("engine._demo", "the engine on a local six-node cluster, in about a minute"),
    "bench": ("engine._bench", "throughput/latency against redis-py and redis-benchmark"),
    "cluster": ("engine.cli.cluster", "up|down|status: a local cluster in the background"),
    "loadtest": ("engine._loadtest", "reference FastAPI service under headless Locust"),
    "drill": ("engine._drill", "SCENARIO: a failover drill under load (kill-primary, ...)"),
    "fuzz": ("engine._fuzz", "TARGET: coverage-guided fuzzing of the public entries (atheris)"),
}

_USAGE = "usage: python -m engine COMMAND [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<10}{text}" for name, (_, text) in _COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``python -m engine <command>`` to the module that implements it.

    Args:
        argv: Arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The process exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in _COMMANDS:
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(_COMMANDS[args[0]][0])
    except ModuleNotFoundError as exc:  # the tools' extras are not installed
        print(
            f"python -m engine {args[0]} needs {exc.name!r}: "
            "pip install 'redis-session-engine[testing,fastapi,loadtest,charts]'",
            file=sys.stderr,
        )
        return 2
    code: int = module.main(args[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
