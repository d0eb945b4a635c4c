"""`mukv plugins`: what is registered, from which package, with which settings, and what is broken."""

from __future__ import annotations

import argparse
import json

from .common import _table


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ..registry import ROLES, registry
    from ..specs import settings_defaults, settings_model

    reg = registry()
    rows = []
    for role in ROLES:
        for name in sorted(reg.entries[role]):
            e = reg.entries[role][name]
            model = settings_model(e.component)
            rows.append({"role": role, "name": e.name, "plugin": e.plugin, "package": e.package, "status": "ok",
                         "settings": settings_defaults(e.component),
                         "settings_schema": model.model_json_schema() if model is not None else None,
                         "error": None})
    for p in reg.problems:
        rows.append({"role": p.role, "name": p.name, "plugin": p.plugin, "package": p.package, "status": p.status,
                     "settings": None, "settings_schema": None, "error": p.error})
    if args.role:
        rows = [r for r in rows if r["role"] == args.role or (r["role"] is None and r["status"] == "broken")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    ok = [r for r in rows if r["status"] == "ok"]
    print(_table([(r["role"], r["name"], r["plugin"], r["package"], _settings(r["settings"])) for r in ok],
                 ("role", "name", "plugin", "package", "settings")))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print()
        print(_table([(r["status"], r["plugin"], r["package"], r["error"]) for r in bad],
                     ("status", "plugin", "package", "error")))
    return 0


def _settings(defaults: dict | None) -> str:
    if not defaults:
        return ""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in defaults.items())
