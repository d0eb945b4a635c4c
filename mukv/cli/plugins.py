"""`mukv plugins`: what is registered, from which package."""

from __future__ import annotations

import argparse
import json

from .common import _table


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ..registry import ROLES, registry

    reg = registry()
    rows = [(e_role, e.name, e.plugin, e.package) for e_role in ROLES for e in
            (reg.entries[e_role][n] for n in sorted(reg.entries[e_role]))]
    if args.role:
        rows = [r for r in rows if r[0] == args.role]
    if args.json:
        print(json.dumps([dict(zip(("role", "name", "plugin", "package"), r)) for r in rows], indent=1))
        return 0
    print(_table(rows, ("role", "name", "plugin", "package")))
    return 0

