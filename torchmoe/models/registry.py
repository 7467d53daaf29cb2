"""Model families by name: how to build each, its flavors and its config checks."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.models.deepseek_v2.flavors import FLAVORS as DEEPSEEK_V2_FLAVORS
from torchmoe.models.deepseek_v3.flavors import FLAVORS as DEEPSEEK_V3_FLAVORS
from torchmoe.models.deepseek_v3.model import build_deepseek_v3
from torchmoe.models.deepseek_v3.model import validate as validate_mla
from torchmoe.models.llama.flavors import FLAVORS as LLAMA_FLAVORS
from torchmoe.models.llama.model import build_llama
from torchmoe.models.llama.model import validate as validate_gqa
from torchmoe.models.mixtral.flavors import FLAVORS as MIXTRAL_FLAVORS
from torchmoe.models.mixtral.model import build_mixtral
from torchmoe.models.qwen3_moe.flavors import FLAVORS as QWEN3_MOE_FLAVORS
from torchmoe.models.qwen3_moe.model import build_qwen3_moe
from torchmoe.parallel.plans import ParallelizeFn, parallelize


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, dict[str, dict]]  # flavor -> {section: {key: value}}
    build: Callable[[JobConfig], nn.Module]  # builds on the current default device
    validate: Callable[[JobConfig], None]  # raises ConfigError for inconsistent keys
    parallelize: ParallelizeFn  # default plan; [parallelism] plan overrides it
    heads_keys: tuple[str, ...]  # [model] head counts that tensor parallelism splits


_MLA_HEADS = ("n_heads",)
_GQA_HEADS = ("n_heads", "n_kv_heads")

_SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "deepseek_v3",
            DEEPSEEK_V3_FLAVORS,
            build_deepseek_v3,
            validate_mla,
            parallelize,
            _MLA_HEADS,
        ),
        ModelSpec(
            "deepseek_v2",
            DEEPSEEK_V2_FLAVORS,
            build_deepseek_v3,
            validate_mla,
            parallelize,
            _MLA_HEADS,
        ),
        ModelSpec("mixtral", MIXTRAL_FLAVORS, build_mixtral, validate_gqa, parallelize, _GQA_HEADS),
        ModelSpec(
            "qwen3_moe", QWEN3_MOE_FLAVORS, build_qwen3_moe, validate_gqa, parallelize, _GQA_HEADS
        ),
        ModelSpec("llama", LLAMA_FLAVORS, build_llama, validate_gqa, parallelize, _GQA_HEADS),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    """The family called ``name``, or a ConfigError listing the families."""
    if name not in _SPECS:
        raise ConfigError(
            f"model.name = {name!r} is not a model family; choose one of: {', '.join(_SPECS)}"
        )
    return _SPECS[name]
