"""float8 linears through torchao: which modules convert, and that training still runs."""

import pytest
import torch
from torchao.float8.float8_linear import Float8Linear

from tests.quant.small_model import assert_default_conversion, float8_config, small_model
from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.quant.float8 import apply_float8_linears


def test_eligible_linears_convert_and_excluded_ones_stay():
    cfg = float8_config("float8")
    model = small_model(cfg)
    apply_float8_linears(model, cfg.quantize)
    assert_default_conversion(model, Float8Linear)
    tokens = torch.randint(0, 4000, (2, 16))
    model(tokens).float().square().mean().backward()  # float8 casts run (on CPU too)
    assert model.layers["0"].attention.wq.weight.grad.abs().sum() > 0


def test_off_by_default_changes_nothing():
    cfg = build_config({}, [("model.dim", "64"), ("training.seq_len", "16")])
    model = build_model(cfg)
    apply_float8_linears(model, cfg.quantize)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_float8_linears_with_tensor_parallelism_are_refused_in_one_line(tiny_config, monkeypatch):
    from torchmoe.config.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"float8_linear with parallelism.tp > 1") as err:
        tiny_config(**{"quantize.float8_linear": "true", "parallelism.tp": "2"})
    assert "\n" not in str(err.value)
