"""Model families by name: how to build each, its flavors and its config checks."""

from dataclasses import dataclass
from typing import Callable

from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.deepseek_v3.flavors import FLAVORS as DEEPSEEK_V3_FLAVORS
from torchmoe.models.deepseek_v3.model import build_deepseek_v3, validate as validate_deepseek_v3
from torchmoe.models.mixtral.flavors import FLAVORS as MIXTRAL_FLAVORS
from torchmoe.models.mixtral.model import build_mixtral, validate as validate_mixtral
from torchmoe.parallel.plans import ParallelizeFn, parallelize


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, dict[str, dict]]  # flavor -> {section: {key: value}}
    build: Callable[[JobConfig], nn.Module]  # builds on the current default device
    validate: Callable[[JobConfig], None]  # raises ConfigError for inconsistent keys
    parallelize: ParallelizeFn  # default plan; [parallelism] plan overrides it
    heads_keys: tuple[str, ...]  # [model] head counts that tensor parallelism splits


_SPECS = {
    "deepseek_v3": ModelSpec("deepseek_v3", DEEPSEEK_V3_FLAVORS, build_deepseek_v3,
                             validate_deepseek_v3, parallelize, ("n_heads",)),
    "mixtral": ModelSpec("mixtral", MIXTRAL_FLAVORS, build_mixtral, validate_mixtral,
                         parallelize, ("n_heads", "n_kv_heads")),
}


def get_model_spec(name: str) -> ModelSpec:
    """The family called ``name``, or a ConfigError listing the families."""
    if name not in _SPECS:
        raise ConfigError(f"model.name = {name!r} is not a model family; choose one of: "
                          f"{', '.join(_SPECS)}")
    return _SPECS[name]
