"""Model families by name: flavors, how the job config becomes the builder's arguments, the
builder, the family's config checks, its default parallelize plan and its Hugging Face adapter.

The plan and the adapter are named, not imported ('package.module:attribute', resolved by
``torchmoe.parallel.plans.load_plan`` and ``torchmoe.convert.hf``), so the registry stays below
the layers that hold them.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.config.model_args import deepseek_v3_args, gqa_args
from torchmoe.config.model_checks import check_gqa, check_mla
from torchmoe.config.schema import JobConfig
from torchmoe.models.deepseek_v2.flavors import FLAVORS as DEEPSEEK_V2_FLAVORS
from torchmoe.models.deepseek_v3.flavors import FLAVORS as DEEPSEEK_V3_FLAVORS
from torchmoe.models.deepseek_v3.model import build_deepseek_v3
from torchmoe.models.llama.flavors import FLAVORS as LLAMA_FLAVORS
from torchmoe.models.llama.model import build_llama
from torchmoe.models.mixtral.flavors import FLAVORS as MIXTRAL_FLAVORS
from torchmoe.models.mixtral.model import build_mixtral
from torchmoe.models.qwen3_moe.flavors import FLAVORS as QWEN3_MOE_FLAVORS
from torchmoe.models.qwen3_moe.model import build_qwen3_moe

DEFAULT_PLAN = "torchmoe.parallel.plans:parallelize"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, dict[str, dict]]  # flavor -> {section: {key: value}}
    args: Callable[[JobConfig], Any]  # the job config -> the builder's Args
    build: Callable[[Any], nn.Module]  # Args -> the model, on the current default device
    check: Callable[[JobConfig], None]  # the family's cross-key checks (a ConfigError)
    heads_keys: tuple[str, ...]  # [model] head counts that tensor parallelism splits
    hf_adapter: str  # its Hugging Face conversion ('module:ADAPTER' in torchmoe/convert/hf)
    plan: str = DEFAULT_PLAN  # default parallelize plan; [parallelism] plan overrides it


_MLA_HEADS = ("n_heads",)
_GQA_HEADS = ("n_heads", "n_kv_heads")

_SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "deepseek_v3",
            DEEPSEEK_V3_FLAVORS,
            deepseek_v3_args,
            build_deepseek_v3,
            check_mla,
            _MLA_HEADS,
            "torchmoe.convert.hf.deepseek_v3:ADAPTER",
        ),
        ModelSpec(
            "deepseek_v2",
            DEEPSEEK_V2_FLAVORS,
            deepseek_v3_args,
            build_deepseek_v3,
            check_mla,
            _MLA_HEADS,
            "torchmoe.convert.hf.deepseek_v2:ADAPTER",
        ),
        ModelSpec(
            "mixtral",
            MIXTRAL_FLAVORS,
            gqa_args,
            build_mixtral,
            check_gqa,
            _GQA_HEADS,
            "torchmoe.convert.hf.mixtral:ADAPTER",
        ),
        ModelSpec(
            "qwen3_moe",
            QWEN3_MOE_FLAVORS,
            gqa_args,
            build_qwen3_moe,
            check_gqa,
            _GQA_HEADS,
            "torchmoe.convert.hf.qwen3_moe:ADAPTER",
        ),
        ModelSpec(
            "llama",
            LLAMA_FLAVORS,
            gqa_args,
            build_llama,
            check_gqa,
            _GQA_HEADS,
            "torchmoe.convert.hf.llama:ADAPTER",
        ),
    )
}


def model_specs() -> list[ModelSpec]:
    """Every registered family."""
    return list(_SPECS.values())


def get_model_spec(name: str) -> ModelSpec:
    """The family called ``name``, or a ConfigError listing the families."""
    if name not in _SPECS:
        raise ConfigError(
            f"model.name = {name!r} is not a model family; choose one of: {', '.join(_SPECS)}"
        )
    return _SPECS[name]


def build_model(cfg: JobConfig) -> nn.Module:
    """The model ``cfg`` describes, on the current default device (``torch.device("meta")``
    to allocate nothing)."""
    spec = get_model_spec(cfg.model.name)
    return spec.build(spec.args(cfg))
