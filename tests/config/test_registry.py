"""The registry names what lives above it (default plans, Hugging Face adapters); every name
must resolve to the family's own."""

import importlib

import pytest

from torchmoe.config.registry import get_model_spec, model_specs
from torchmoe.parallel.plans import load_plan, parallelize


@pytest.mark.parametrize("spec", model_specs(), ids=lambda s: s.name)
def test_named_plan_and_adapter_resolve_to_the_familys(spec):
    assert load_plan(spec.plan) is parallelize
    module, _, attribute = spec.hf_adapter.partition(":")
    adapter = getattr(importlib.import_module(module), attribute)
    assert adapter.family == spec.name
    assert get_model_spec(spec.name) is spec
