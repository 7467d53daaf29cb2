"""Hugging Face checkpoints <-> torchmoe: one module per family (config.json keys both ways
and tensor name rules), shared pieces in common.py, files in io.py, the two directions in
convert.py; scripts/convert_hf.py is the command line."""

from torchmoe.config.errors import ConfigError
from torchmoe.models.hf import deepseek_v2, deepseek_v3, llama, mixtral, qwen3_moe
from torchmoe.models.hf.adapter import HFAdapter

_ADAPTERS = (deepseek_v3.ADAPTER, deepseek_v2.ADAPTER, mixtral.ADAPTER, qwen3_moe.ADAPTER,
             llama.ADAPTER)


def adapter_for_model_type(model_type: str) -> HFAdapter:
    for a in _ADAPTERS:
        if a.model_type == model_type:
            return a
    raise ConfigError(f"config.json: model_type = {model_type!r} has no torchmoe converter; "
                      f"supported: {', '.join(a.model_type for a in _ADAPTERS)}")


def adapter_for_family(family: str) -> HFAdapter:
    for a in _ADAPTERS:
        if a.family == family:
            return a
    raise ConfigError(f"model.name = {family!r} has no Hugging Face export; supported: "
                      f"{', '.join(a.family for a in _ADAPTERS)}")
