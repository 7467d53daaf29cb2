"""Renaming a state dict between torchmoe and Hugging Face names, one rule per tensor kind.

A rule pairs a torchmoe name pattern with a Hugging Face one; ``{layer}`` stands for a block
index and, on the Hugging Face side only, ``{expert}`` for an expert index: such a rule maps one
grouped expert tensor [E, ...] to E per-expert tensors (stacked back in expert order on
import). An expert rule with a ``part`` maps only index ``part`` of the stack's dim 1: several
rules fill one torchmoe tensor, as gate and up fill the experts' ``w13`` [E, 2, F, D]. A rule may
also carry a transform and its inverse (the RoPE channel permutation).
"""

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from torchmoe.config.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Rule:
    ours: str  # torchmoe name pattern
    hf: str  # Hugging Face name pattern
    to_hf: Transform = _same  # applied on export (per expert for {expert} rules)
    from_hf: Transform = _same  # its inverse, applied on import
    copy: bool = False  # export-only duplicate (see module docstring)
    part: int | None = None  # an {expert} rule's index along the stack's dim 1

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


@functools.cache
def _compile(pattern: str) -> re.Pattern:
    """``layers.{layer}.x`` -> a regex with one named integer group per placeholder."""
    parts = re.split(r"\{(layer|expert)\}", pattern)
    body = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(body)


def _matches(name: str, rules: list[Rule], side: str) -> list[tuple[Rule, dict[str, str]]]:
    out = []
    for rule in rules:
        m = _compile(getattr(rule, side)).fullmatch(name)
        if m:
            out.append((rule, m.groupdict()))
    return out


def is_expert_stack(name: str, rules: list[Rule]) -> bool:
    """torchmoe tensor ``name`` stacks per-expert Hugging Face tensors along dim 0."""
    return any(rule.per_expert for rule, _ in _matches(name, rules, "ours") if not rule.copy)


def to_hf(
    state: dict[str, torch.Tensor], rules: list[Rule], family: str, first_expert: int = 0
) -> dict[str, torch.Tensor]:
    """torchmoe state dict -> Hugging Face names and layouts (tensors may be views). Expert
    stacks may be slices of their stack starting at expert ``first_expert``."""
    out = {}
    for name, t in state.items():
        hits = _matches(name, rules, "ours")
        own = [h for h in hits if not h[0].copy]
        # the first rule, or every part of the stack the first rule fills part of
        primary = [h for h in own if h[0].part is not None and h[0].ours == own[0][0].ours]
        primary = primary or own[:1]
        if not primary:
            raise ConfigError(
                f"torchmoe tensor {name} has no Hugging Face name in the {family} "
                "mapping (torchmoe/convert/hf); the model and the mapping disagree"
            )
        for rule, groups in primary + [h for h in hits if h[0].copy]:
            if rule.per_expert:
                for e, t_e in enumerate(t.unbind(0), start=first_expert):
                    t_e = t_e if rule.part is None else t_e[rule.part]
                    out[rule.hf.format(expert=e, **groups)] = rule.to_hf(t_e)
            else:
                out[rule.hf.format(**groups)] = rule.to_hf(t)
    return out


def from_hf(
    state: Mapping[str, torch.Tensor],
    rules: list[Rule],
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> torchmoe names and layouts, each in ``dtypes[name]`` when
    given. ``state`` may read its tensors on access: each is read once, and an expert stack is
    filled in place one expert at a time, so only the stack and one expert are held. Callers
    check the names first (every key here must match a rule)."""
    plan, experts, names = [], {}, {}
    for name in state:  # names only: which experts (and parts) each stack has
        hits = _matches(name, rules, "hf")[:1]
        if not hits:
            raise ConfigError(f"Hugging Face tensor {name} has no torchmoe counterpart")
        rule, groups = hits[0]
        if rule.copy:
            continue
        e = groups.pop("expert", None)
        ours = rule.ours.format(**groups)
        plan.append((name, rule, ours, None if e is None else int(e)))
        if e is not None:
            experts.setdefault(ours, set()).add((int(e), rule.part))
            names[ours] = (rule.ours, groups)
    parts = _parts(rules)
    for ours, found in experts.items():
        _check_complete(ours, found, rules, *names[ours])
    count = {ours: len({e for e, _ in found}) for ours, found in experts.items()}
    out: dict[str, torch.Tensor] = {}
    for name, rule, ours, e in plan:
        t = rule.from_hf(state[name])
        dtype = (dtypes or {}).get(ours, t.dtype)
        if e is None:
            out[ours] = t.to(dtype)
            continue
        stacked = (count[ours],)
        if rule.part is not None:
            stacked += (parts[rule.ours],)
        if ours not in out:
            out[ours] = torch.empty((*stacked, *t.shape), dtype=dtype)
        if t.shape != out[ours].shape[len(stacked) :]:
            raise ConfigError(
                f"Hugging Face tensor {name} has shape {list(t.shape)}; the other experts of "
                f"{ours} have {list(out[ours].shape[len(stacked) :])}"
            )
        out[ours][e if rule.part is None else (e, rule.part)] = t
    return out


def _parts(rules: list[Rule]) -> dict[str, int]:
    """How many parts each torchmoe expert stack pattern with part rules has (its dim 1)."""
    parts: dict[str, int] = {}
    for r in rules:
        if r.part is not None and not r.copy:
            parts[r.ours] = max(parts.get(r.ours, 0), r.part + 1)
    return parts


def _check_complete(
    ours: str,
    found: set[tuple[int, int | None]],
    rules: list[Rule],
    pattern: str,
    groups: dict[str, str],
) -> None:
    """Stack ``ours`` has every expert 0..E-1, each with every part its rules name (a stack
    left partly unfilled would hold uninitialised memory)."""
    indices = {e for e, _ in found}
    if indices != set(range(len(indices))):
        missing = min(set(range(max(indices) + 1)) - indices)
        raise ConfigError(f"the experts of {ours} are incomplete: expert {missing} is missing")
    fills = [r for r in rules if r.per_expert and not r.copy and r.ours == pattern]
    for e in sorted(indices):
        for r in fills:
            if (e, r.part) not in found:
                raise ConfigError(
                    f"the experts of {ours} are incomplete: "
                    f"{r.hf.format(expert=e, **groups)} is missing"
                )
