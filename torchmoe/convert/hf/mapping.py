"""Renaming a state dict between torchmoe and Hugging Face names, one rule per tensor kind.

A rule pairs a torchmoe name pattern with a Hugging Face one; ``{layer}`` stands for a block
index and, on the Hugging Face side only, ``{expert}`` for an expert index: such a rule maps one
3-D grouped expert tensor [E, ...] to E per-expert 2-D tensors (stacked back in expert order on
import). A rule may also carry a transform and its inverse (the RoPE channel permutation).
"""

import functools
import re
from collections.abc import Callable
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


def to_hf(
    state: dict[str, torch.Tensor], rules: list[Rule], family: str
) -> dict[str, torch.Tensor]:
    """torchmoe state dict -> Hugging Face names and layouts (tensors may be views)."""
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
                for e, t_e in enumerate(t.unbind(0)):
                    out[rule.hf.format(expert=e, **groups)] = rule.to_hf(t_e)
            else:
                out[rule.hf.format(**groups)] = rule.to_hf(t)
    return out


def from_hf(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> torchmoe names and layouts. Callers check the names first
    (every key here must match a rule, and each expert stack must be complete)."""
    out, experts = {}, {}
    for name, t in state.items():
        hits = _matches(name, rules, "hf")[:1]
        if not hits:
            raise ConfigError(f"Hugging Face tensor {name} has no torchmoe counterpart")
        rule, groups = hits[0]
        if rule.copy:
            continue
        e = groups.pop("expert", None)
        ours = rule.ours.format(**groups)
        if e is None:
            out[ours] = rule.from_hf(t)
        else:
            experts.setdefault(ours, (rule, {}))[1][int(e)] = t
    for ours, (rule, by_index) in experts.items():
        out[ours] = torch.stack([rule.from_hf(by_index[e]) for e in range(len(by_index))])
    return out
