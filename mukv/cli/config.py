"""`mukv config show`: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import STORE_BACKEND, _table, user_settings

CONFIG_DESCRIPTION = (
    "Print the configuration a command would use, and the source of every value: mukv's default, "
    "the model's own defaults, the policy, the user file ($MUKV_CONFIG_FILE or ~/.config/mukv/config.toml), "
    "MUKV_* environment variables, or the command line. With STORE, the configuration its stream "
    "recorded, with the overrides a command opening it would apply (only those Session.fork allows).")


def _cmd_config_show(args: argparse.Namespace) -> int:
    from ..config import MukvConfig, merge
    from ..settings import explain, new_session_layers
    from ..specs import check

    if args.store is None:
        eff = user_settings(args, reopen=False)
        v = eff.values
        layers = new_session_layers(v["model"], v["policy"], eff.config_layers, eff.sources["policy"])
        merged: dict[str, Any] = {}
        for _, fields in layers:
            merged = merge(merged, fields)
        config = MukvConfig.build(merged)
        check(config)  # component names and settings, as a session would
        rows = explain(config, layers)
        shown = dict(v)
        shown["model"] = v["model"] if v["model"] is not None else "mukv-tiny"
        shown["policy"] = v["policy"] if v["policy"] is not None else "mukv"
        shown["backend"] = v["backend"] or STORE_BACKEND
        shown["device"] = v["device"] or "auto (cuda if available, else cpu)"
        shown["backend_options"] = v["backend_options"] or {}
        shown["question_log"] = bool(v["question_log"])
        _print(args, shown, eff.sources, rows, config)
        return 0
    rows, shown, sources, config = _stored_rows(args)
    _print(args, shown, sources, rows, config)
    return 0


def _stored_rows(args: argparse.Namespace):
    from ..settings import flatten, source_of, with_sources
    from ..specs import json_safe
    from .common import _open_store

    eff = user_settings(args, reopen=True)
    session = _open_store(args)
    try:
        stored = (session.backend.get_state("session", {}) or {}).get("config") or {}
        config = session.config
        layers = [(f"store {args.store}", stored)] + list(eff.config_layers)
        if eff.values["policy"] is not None:
            from ..config import policy_fields

            layers.insert(1, ("--policy", policy_fields(eff.values["policy"])))
        _, origin = with_sources(layers)
        rows = [(p, val, source_of(p, origin)) for p, val in flatten(json_safe(config.model_dump())).items()]
        shown = {"model": session.backend.get_state("session", {}).get("model", session.model.name),
                 "stream_id": args.stream_id, "backend": eff.values["backend"] or STORE_BACKEND,
                 "device": str(session.device), "question_log": bool(eff.values["question_log"])}
        sources = {"model": "store" if not getattr(args, "model", None) else "command line",
                   "stream_id": "command line" if args.stream_id != "default" else "default",
                   "backend": eff.sources["backend"], "device": eff.sources["device"],
                   "question_log": eff.sources["question_log"]}
    finally:
        session.close()
    return rows, shown, sources, config


def _print(args: argparse.Namespace, values: dict[str, Any], sources: dict[str, str], rows: list, config) -> None:
    from ..specs import config_hash, json_safe

    keys = [k for k in ("model", "policy", "stream_id", "device", "backend", "backend_options", "question_log")
            if k in values]
    if args.json:
        print(json.dumps({
            "settings": {k: {"value": json_safe(values[k]), "source": sources.get(k, "default")} for k in keys},
            "config": {p: {"value": val, "source": src} for p, val, src in rows},
            "config_hash": config_hash(config),
        }, indent=1))
        return

    def show(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(json_safe(value))

    print(_table([(k, show(values[k] if values[k] is not None else "(default)"), sources.get(k, "default"))
                  for k in keys], ("setting", "value", "source")))
    print()
    print(_table([(p, show(val), src) for p, val, src in rows], ("field", "value", "source")))
    print()
    print(f"config hash {config_hash(config)}")
