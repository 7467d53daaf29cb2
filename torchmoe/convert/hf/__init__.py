"""Hugging Face checkpoints <-> torchmoe: one module per family (config.json keys both ways
and tensor name rules), shared pieces in common.py, files in io.py, the two directions in
convert.py; scripts/convert_hf.py is the command line."""

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf import deepseek_v2, deepseek_v3, llama, mixtral, qwen3_moe
from torchmoe.convert.hf.adapter import HFAdapter

_ADAPTERS = (
    deepseek_v3.ADAPTER,
    deepseek_v2.ADAPTER,
    mixtral.ADAPTER,
    qwen3_moe.ADAPTER,
    llama.ADAPTER,
)


def _find(attribute: str, value: str, error: str) -> HFAdapter:
    """The adapter whose ``attribute`` equals ``value``, or a ConfigError starting ``error``."""
    for a in _ADAPTERS:
        if getattr(a, attribute) == value:
            return a
    supported = ", ".join(getattr(a, attribute) for a in _ADAPTERS)
    raise ConfigError(f"{error}; supported: {supported}")


def adapter_for_model_type(model_type: str) -> HFAdapter:
    return _find(
        "model_type",
        model_type,
        f"config.json: model_type = {model_type!r} has no torchmoe converter",
    )


def adapter_for_family(family: str) -> HFAdapter:
    return _find("family", family, f"model.name = {family!r} has no Hugging Face export")
