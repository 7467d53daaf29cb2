"""Hugging Face checkpoints <-> torchmoe: one module per family (config.json keys both ways
and tensor name rules), shared pieces in common.py, files in io.py, the two directions in
convert.py; scripts/convert_hf.py is the command line."""

import importlib

from torchmoe.config.errors import ConfigError
from torchmoe.config.registry import model_specs
from torchmoe.convert.hf.adapter import HFAdapter


def _adapters() -> list[HFAdapter]:
    """Each registered family's adapter (the registry names it: 'module:ADAPTER')."""
    out = []
    for spec in model_specs():
        module, _, attribute = spec.hf_adapter.partition(":")
        out.append(getattr(importlib.import_module(module), attribute))
    return out


def _find(attribute: str, value: str, error: str) -> HFAdapter:
    """The adapter whose ``attribute`` equals ``value``, or a ConfigError starting ``error``."""
    adapters = _adapters()
    for a in adapters:
        if getattr(a, attribute) == value:
            return a
    supported = ", ".join(getattr(a, attribute) for a in adapters)
    raise ConfigError(f"{error}; supported: {supported}")


def adapter_for_model_type(model_type: str) -> HFAdapter:
    return _find(
        "model_type",
        model_type,
        f"config.json: model_type = {model_type!r} has no torchmoe converter",
    )


def adapter_for_family(family: str) -> HFAdapter:
    return _find("family", family, f"model.name = {family!r} has no Hugging Face export")
