"""Keys a flavor set that contradict a choice the user made explicitly give way to it.

A flavor fills every key the recipe and the command line leave open (load.py), so switching one
key (``--moe.load_balancing_type sinkhorn`` on DeepSeek-V3) used to fail on each flavor key that
only made sense with the old choice, one error per run. Here each rule names, for the user's
value, the keys that must change and the value that fits. Keys from the flavor take that value
(an info line lists them); keys the user set too are listed together in one error.
"""

import json
import logging
from collections.abc import Callable
from typing import Any

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig

logger = logging.getLogger(__name__)


def _balancing(cfg: JobConfig) -> dict[str, Any]:
    """What moe.load_balancing_type = sinkhorn or none rules out."""
    e, needs = cfg.moe, {}
    types = set(e.load_balancing_type)
    if types & {"sinkhorn", "none"} and any(c > 0 for c in e.aux_loss_coeff):
        needs["moe.aux_loss_coeff"] = [0.0]
    if "sinkhorn" in types:
        if e.enable_expert_bias:
            needs["moe.enable_expert_bias"] = False
        if e.router_num_groups:
            needs["moe.router_num_groups"] = 0
        if e.router_group_topk:
            needs["moe.router_group_topk"] = 0
        if e.force_load_balance:
            needs["moe.force_load_balance"] = False
    return needs  # only keys whose value does not fit yet


# (the user's key, what its value needs from other keys)
RULES: list[tuple[str, Callable[[JobConfig], dict[str, Any]]]] = [
    ("moe.load_balancing_type", _balancing),
]


def _show(value: Any) -> str:
    """A value as TOML spells it (false, [0.0], "x")."""
    return json.dumps(value)


def _get(cfg: JobConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def resolve(cfg: JobConfig, explicit: set[str], from_flavor: set[str]) -> None:
    """Apply every rule whose key the user set (``explicit``): flavor keys give way, and
    user-set conflicts raise one ConfigError naming them all."""
    for key, needs_of in RULES:
        if key not in explicit:
            continue
        needs = needs_of(cfg)
        clashes = {k: v for k, v in needs.items() if k in explicit}
        if clashes:
            raise ConfigError(
                f"{key} = {_show(_get(cfg, key))} needs "
                + ", ".join(
                    f"{k} = {_show(v)} (you set {_show(_get(cfg, k))})" for k, v in clashes.items()
                )
                + "; change those keys too, or keep the flavor's "
                f"{key}"
            )
        changed = {k: v for k, v in needs.items() if k in from_flavor}
        for k, v in changed.items():
            section, name = k.split(".")
            old = _get(cfg, k)
            setattr(getattr(cfg, section), name, v)
            changed[k] = (old, v)
        if changed:
            logger.info(
                "%s = %s (yours) overrides the flavor's %s",
                key,
                _show(_get(cfg, key)),
                ", ".join(
                    f"{k} = {_show(old)} -> {_show(new)}" for k, (old, new) in changed.items()
                ),
            )
