"""The ``mukv`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import MukvError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import ROLES, registry

    reg = registry()
    rows = [(e_role, e.name, e.plugin, e.package) for e_role in ROLES for e in
            (reg.entries[e_role][n] for n in sorted(reg.entries[e_role]))]
    if args.role:
        rows = [r for r in rows if r[0] == args.role]
    widths = [max(len(str(r[i])) for r in rows + [("role", "name", "plugin", "package")]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("role", "name", "plugin", "package"), widths)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mukv`` command."""
    parser = argparse.ArgumentParser(prog="mukv", description="Multi-grained KV-cache memory for streaming video QA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list registered components and the package each comes from")
    from .registry import ROLES

    p.add_argument("--role", choices=list(ROLES), help="only this role")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MukvError as exc:
        print(f"mukv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
