"""What the harness runs: each policy's resolved configuration at the shared KV budget.

Every policy answers from the same number of KV tokens: the budget is MuKV's at
its defaults (top-k 20/32/12 over 49/196/784-token blocks kept at 0.1/0.1/0.8,
about 8.2K tokens for 196 tokens per frame), or at the model's own levels where its
checkpoint has them (``mukv_config.json``; mukv-tiny: 7/49/196-token blocks, about 800
tokens), unless ``budget_tokens`` says otherwise. A policy of frame blocks gets
``budget // tokens_per_block`` blocks. ``NAME@SCALE`` runs policy ``NAME`` at ``SCALE``
times the shared budget (``rekv@1.5``: ReKV at 3:2, as MuKV's paper compares them).
Full context takes every frame while the stream fits; "no_memory" answers from the
question alone (a text-only floor).

Configuration applied to every policy (``config``) and to one (``policy_config``) goes
over the policy's own, so a codec or any other option can be measured per policy
without new code here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import MukvConfig, merge
from ..errors import ConfigError

#: The text-only floor: no visual KV at all.
NO_MEMORY = "no_memory"
#: Each question answered from its own scene only.
ORACLE = "oracle_scene"
#: Each question answered from the blocks the memory stores its scene in (the scene's frames widened
#: to the stream's block grid): what the memory reads when it finds perfectly.
ORACLE_BLOCKS = "oracle_blocks"
#: The rows no policy may take the name of.
ORACLES = (ORACLE, ORACLE_BLOCKS)
#: Allowed relative difference between a policy's realised KV tokens and its budget.
BUDGET_TOLERANCE = 0.05

_SPEC = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<scale>[0-9]*\.?[0-9]+)x?)?$")


@dataclass
class PolicyPlan:
    """A policy as run by the harness.

    Attributes:
        name: its label in the results (``rekv``, ``rekv@1.5x``).
        policy: the registered policy it runs (``no_memory``: the frame-block floor).
        config: its fully resolved configuration.
        full_context: takes every stored block while the stream fits.
        budget: KV tokens it should read per answer (system prompt excluded); ``None``
            where the policy decides (full context).
        scale: its budget as a multiple of the shared one.
    """

    name: str
    config: MukvConfig
    full_context: bool = False
    policy: str = ""
    budget: int | None = None
    scale: float = 1.0

    def storage_key(self) -> str:
        """What decides the stored blocks: plans with equal keys share one ingest."""
        levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in self.config.levels]
        data = self.config.model_dump(exclude={"levels", "retrieval", "assembly", "generation"})
        return json.dumps({"levels": levels, **data}, sort_keys=True, default=str)


def parse_policy(spec: str) -> tuple[str, float]:
    """``"rekv@1.5"`` -> ``("rekv", 1.5)``; ``"mukv"`` -> ``("mukv", 1.0)``.

    Raises:
        ConfigError: not ``NAME`` or ``NAME@SCALE`` with a positive scale.
    """
    m = _SPEC.match(str(spec))
    if not m:
        raise ConfigError(f"policy {spec!r}: expected NAME or NAME@SCALE (e.g. rekv@1.5)")
    scale = float(m.group("scale")) if m.group("scale") else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"policy {spec!r}: the budget scale must be positive")
    return m.group("name"), scale


def label(name: str, scale: float) -> str:
    return name if scale == 1.0 else f"{name}@{scale:g}x"


def mukv_budget(config: MukvConfig, tokens_per_frame: int) -> int:
    """KV tokens a configuration retrieves at its top-k (system prompt excluded)."""
    from ..interfaces import Compressor

    total = 0
    for lv in config.levels:
        length = lv.tokens if lv.tokens is not None else lv.frames * tokens_per_frame
        total += lv.top_k * Compressor.kept_count(lv, length)
    return total


def shared_budget(tokens_per_frame: int, model_defaults: dict[str, Any] | None = None,
                  config: Mapping[str, Any] | None = None) -> int:
    """MuKV's budget: the ``mukv`` policy's top-k over the model's levels, with ``config`` applied."""
    return mukv_budget(MukvConfig.from_policy("mukv", under=model_defaults, **dict(config or {})), tokens_per_frame)


def plan_policies(names: Sequence[str | Mapping[str, Any]], tokens_per_frame: int, budget_tokens: int | None = None,
                  model_defaults: dict[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                  policy_config: Mapping[str, Mapping[str, Any]] | None = None) -> list[PolicyPlan]:
    """Resolved configurations of the policies, each at its share of one KV budget.

    Args:
        names: policy specs (``NAME`` or ``NAME@SCALE``, or ``{"name": NAME, **settings}``).
        tokens_per_frame: the model's visual tokens per frame.
        budget_tokens: the shared budget (default: MuKV's at the model's levels).
        model_defaults: the model's own configuration fields (applied under each policy).
        config: fields applied over every policy.
        policy_config: fields applied over one policy, by its spec or its name.

    Raises:
        ConfigError: a bad spec, a duplicate, an unknown policy or invalid fields.
    """
    config = dict(config or {})
    policy_config = dict(policy_config or {})
    keys = [s if isinstance(s, str) else str(s.get("name")) for s in names]  # a spec with settings: its name
    unknown = sorted(set(policy_config) - set(keys) - {parse_policy(n)[0] for n in keys})
    if unknown:
        raise ConfigError(f"configuration for policies that are not run: {unknown}; running {list(names)}")
    budget = budget_tokens if budget_tokens is not None else shared_budget(tokens_per_frame, model_defaults, config)
    plans: list[PolicyPlan] = []
    seen: set[str] = set()
    for spec, key in zip(names, keys):
        settings = dict(spec) if isinstance(spec, Mapping) else None  # {"name": "rekv", "top_k": 32}
        spec = key
        name, scale = parse_policy(spec)
        lab = label(name, scale)
        if lab in seen or lab in ORACLES:
            raise ConfigError(f"policy {lab!r} is listed twice or is reserved")
        seen.add(lab)
        own = merge(dict(policy_config.get(name, {})), dict(policy_config.get(spec, {})))
        extra = merge(config, own)
        target = int(round(budget * scale))
        if name == NO_MEMORY:
            cfg = MukvConfig.from_policy("frame_topk", under=model_defaults, **extra).replace(
                levels=[{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 0}])
            plans.append(PolicyPlan(lab, cfg, policy=name, budget=0, scale=scale))
            continue
        cfg = MukvConfig.from_policy({**settings, "name": name} if settings else name, under=model_defaults, **extra)
        if name == "full_context":
            plans.append(PolicyPlan(lab, cfg, full_context=True, policy=name, budget=None, scale=scale))
            continue
        cfg = fit_budget(cfg, target, tokens_per_frame)
        plans.append(PolicyPlan(lab, cfg, policy=name, budget=target, scale=scale))
    return plans


def fit_budget(cfg: MukvConfig, target: int, tokens_per_frame: int) -> MukvConfig:
    """``cfg`` with its top-k set to read about ``target`` tokens.

    A configuration of one uncompressed level (frame blocks, ReKV) gets
    ``target // tokens_per_block`` blocks (at least one); a multi-level one (MuKV and
    its variants) keeps its own top-k, scaled in proportion when ``target`` differs
    from what they read.
    """
    from ..interfaces import Compressor

    levels = cfg.levels
    if len(levels) == 1 and levels[0].keep_ratio == 1.0:
        lv = levels[0]
        per = Compressor.kept_count(lv, lv.tokens if lv.tokens is not None else lv.frames * tokens_per_frame)
        return cfg.replace(levels=[{**lv.model_dump(), "top_k": max(1, target // per)}])
    own = mukv_budget(cfg, tokens_per_frame)
    if own == 0 or own == target:
        return cfg
    ratio = target / own
    return cfg.replace(levels=[{**lv.model_dump(), "top_k": int(round(lv.top_k * ratio))} for lv in levels])


def with_top_k(defaults: dict[str, Any], top_k: dict[str, int] | None) -> dict[str, Any]:
    """``defaults`` (a model's configuration fields) with MuKV's per-level top-k replaced.

    Raises:
        ConfigError: a level name that the levels do not have, or a negative top-k.
    """
    if not top_k:
        return defaults
    levels = [dict(lv) for lv in (defaults.get("levels")
                                  or MukvConfig.build().model_dump(mode="json")["levels"])]
    names = [lv["name"] for lv in levels]
    unknown = sorted(set(top_k) - set(names))
    if unknown:
        raise ConfigError(f"top-k for unknown level(s) {unknown}; the levels are {names}")
    for lv in levels:
        if lv["name"] in top_k:
            if int(top_k[lv["name"]]) < 0:
                raise ConfigError(f"top-k of level {lv['name']!r} must be >= 0; got {top_k[lv['name']]}")
            lv["top_k"] = int(top_k[lv["name"]])
    return {**defaults, "levels": levels}
