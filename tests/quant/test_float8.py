"""float8 linears through torchao: which modules convert, and that training still runs."""

import pytest
import torch
from torchao.float8.float8_linear import Float8Linear

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.quant.float8 import apply_float8_linears


def test_eligible_linears_convert_and_excluded_ones_stay():
    cfg = build_config(
        {},
        [
            ("model.dim", "64"),
            ("model.inter_dim", "128"),
            ("moe.ffn_hidden_size", "32"),
            ("training.seq_len", "16"),
            ("model.qk_rope_head_dim", "8"),
            ("quantize.float8_linear", "true"),
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0.02, cfg.model.n_layers)
    apply_float8_linears(model, cfg.quantize)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["layers.0.feed_forward.w1"] is Float8Linear
    assert kinds["layers.0.attention.wq"] is Float8Linear
    assert kinds["output"] is torch.nn.Linear  # excluded by default
    assert kinds["layers.1.feed_forward.router.gate"] is torch.nn.Linear
    assert kinds["layers.0.attention.wkv_a"] is torch.nn.Linear  # 64 -> 72: not a multiple of 16
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
