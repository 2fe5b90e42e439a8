"""Command line entry point: ``python -m engine <command> ...``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cluster import main as cluster_main

_USAGE = "usage: python -m engine cluster {up,down,status} [options]"


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
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
