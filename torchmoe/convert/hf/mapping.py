"""Renaming a state dict between torchmoe and Hugging Face names, one rule per tensor kind.

A rule pairs a torchmoe name pattern with a Hugging Face one; ``{layer}`` stands for a block
index and, on the Hugging Face side only, ``{expert}`` for an expert index: such a rule maps one
3-D grouped expert tensor [E, ...] to E per-expert 2-D tensors (stacked back in expert order on
import). A rule may also carry a transform and its inverse (the RoPE channel permutation).
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
        primary = [h for h in hits if not h[0].copy][:1]
        if not primary:
            raise ConfigError(
                f"torchmoe tensor {name} has no Hugging Face name in the {family} "
                "mapping (torchmoe/convert/hf); the model and the mapping disagree"
            )
        for rule, groups in primary + [h for h in hits if h[0].copy]:
            if rule.per_expert:
                for e, t_e in enumerate(t.unbind(0), start=first_expert):
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
    plan, experts = [], {}
    for name in state:  # names only: how many experts each stack has
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
            experts.setdefault(ours, set()).add(int(e))
    for ours, indices in experts.items():
        if indices != set(range(len(indices))):
            missing = min(set(range(max(indices) + 1)) - indices)
            raise ConfigError(f"the experts of {ours} are incomplete: expert {missing} is missing")
    out: dict[str, torch.Tensor] = {}
    for name, rule, ours, e in plan:
        t = rule.from_hf(state[name])
        dtype = (dtypes or {}).get(ours, t.dtype)
        if e is None:
            out[ours] = t.to(dtype)
            continue
        if ours not in out:
            out[ours] = torch.empty((len(experts[ours]), *t.shape), dtype=dtype)
        if t.shape != out[ours].shape[1:]:
            raise ConfigError(
                f"Hugging Face tensor {name} has shape {list(t.shape)}; the other experts of "
                f"{ours} have {list(out[ours].shape[1:])}"
            )
        out[ours][e] = t
    return out
