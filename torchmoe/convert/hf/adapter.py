"""What each family module provides: how config.json and torchmoe's [model]/[moe] keys
translate both ways, and the tensor name rules."""

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.mapping import Rule


@dataclass(frozen=True)
class HFAdapter:
    family: str  # the torchmoe model.name an import builds by default
    model_type: str  # config.json "model_type"
    architecture: str  # the transformers class an export targets
    # (config.json, tensor names) -> {"model": {...}, "moe": {...}}; a ConfigError for what
    # torchmoe lacks
    to_job: Callable[[dict, Collection[str]], dict[str, dict[str, Any]]]
    # JobConfig -> config.json body (a ConfigError for what the HF class cannot express)
    to_hf_config: Callable[[JobConfig], dict[str, Any]]
    # (JobConfig, config.json) -> name rules
    rules: Callable[[JobConfig, dict], list[Rule]]
