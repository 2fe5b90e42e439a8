"""``python -m engine acl``: the ``ACL SETUSER`` rule of a least-privilege engine user.

Reads the one feature table of the library (``engine._acl``), so the rule names exactly the
commands the engine sends for the chosen features, keys under the prefix only.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from .._acl import DEFAULT_FEATURES, FEATURES, format_acl_setuser, permissions
from .console import print_table


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m engine acl``."""
    parser.add_argument("--prefix", default="se", help="the engine's key_prefix")
    parser.add_argument("--user", default="engine", help="the ACL user name")
    parser.add_argument(
        "--features",
        nargs="+",
        default=list(DEFAULT_FEATURES),
        choices=sorted(FEATURES),
        metavar="FEATURE",
        help="; ".join(f"{f.name}: {f.description}" for f in FEATURES.values()),
    )
    parser.add_argument(
        "--explain", action="store_true", help="also show what the rule grants (a table, on stderr)"
    )


def execute(args: argparse.Namespace) -> int:
    """Print the rule (and, with ``--explain``, what it grants)."""
    try:
        rule = format_acl_setuser(args.user, args.prefix, args.features)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(rule)
    if args.explain:
        # On stderr, like the note below: stdout stays the rule alone, ready to paste.
        perms = permissions(args.prefix, args.features)
        print_table(
            f"what the rule grants (features: {', '.join(args.features)})",
            ("GRANT", "VALUES"),
            [
                ("keys", " ".join(perms.key_patterns)),
                ("channels", " ".join(perms.channels) or "(none)"),
                ("commands", textwrap.fill(" ".join(perms.commands), 72)),
            ],
            file=sys.stderr,
        )
    print(
        "# Run it on EVERY node (ACL users are per node), replace <password>; "
        "see README 'Security'.",
        file=sys.stderr,
    )
    return 0
