"""A small DeepSeek-V3 debug model for the float8 conversion tests (dims of 64 and 128, so
most linears take float8 and MLA's kv down projection, 64 -> 72, does not)."""

import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.schema import JobConfig


def float8_config(weight_grad: str, exclude: str | None = None) -> JobConfig:
    """float8 linears on, with ``float8_linear_weight_grad = weight_grad``."""
    overrides = [
        ("model.dim", "64"),
        ("model.inter_dim", "128"),
        ("moe.ffn_hidden_size", "32"),
        ("training.seq_len", "16"),
        ("model.qk_rope_head_dim", "8"),
        ("quantize.float8_linear", "true"),
        ("quantize.float8_linear_weight_grad", weight_grad),
    ]
    if exclude is not None:
        overrides.append(("quantize.float8_exclude", exclude))
    return build_config({}, overrides)


def small_model(cfg: JobConfig) -> torch.nn.Module:
    """The config's model with weights from seed 0."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0.02, cfg.model.n_layers)
    return model


def assert_default_conversion(model: torch.nn.Module, float8_linear: type) -> None:
    """After ``apply_float8_linears`` with the default excludes: the eligible linears are
    ``float8_linear``; the head, the router and the 64 -> 72 projection stay nn.Linear."""
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["layers.0.feed_forward.w1"] is float8_linear
    assert kinds["layers.0.attention.wq"] is float8_linear
    assert kinds["output"] is torch.nn.Linear  # excluded by default
    assert kinds["layers.1.feed_forward.router.gate"] is torch.nn.Linear
    assert kinds["layers.0.attention.wkv_a"] is torch.nn.Linear  # not a multiple of 16
