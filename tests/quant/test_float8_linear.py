"""torchmoe's float8 linear (``quantize.float8_linear_weight_grad = "bfloat16"``): forward and
input gradient against float64 within float8's rounding, the weight gradient exactly the bf16
GEMM, the conversion keeping the parameters and the cached bfloat16 weights; on an sm90 GPU
``torch._scaled_mm`` against the emulation and a training run."""

import copy

import pytest
import torch

from tests.quant.sm90 import float8_trainer, needs_sm90
from tests.quant.small_model import assert_default_conversion, float8_config, small_model
from torchmoe.config.validate import cached_weights_conflict
from torchmoe.quant.float8 import apply_float8_linears
from torchmoe.quant.float8_linear import Float8Linear, Float8MM, emulated
from torchmoe.quant.rowwise import quantize_rowwise
from torchmoe.train.cached_weights import CachedWeights


def _problem(device: str = "cpu", seed: int = 0):
    """x [2, 24, K] and w [N, K] in bf16, rows of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 64, generator=g) * torch.logspace(-2, 2, 24)[:, None]
    w = torch.randn(96, 64, generator=g) * 0.05
    return x.bfloat16().to(device), w.bfloat16().to(device)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_forward_and_gradients_against_float64():
    x, w = _problem()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = Float8MM.apply(x, w)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 @ w64.T
    y64.backward(grad.double())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 24, 96)
    # rowwise scales: every row as exact as the big ones, whatever its magnitude
    for t in range(24):
        assert _relative(y[:, t], y64[:, t]) < 0.06, t
        assert _relative(x.grad[:, t], x64.grad[:, t]) < 0.06, t
    assert _relative(w.grad, w64.grad) < 0.01  # bf16 only
    # the weight gradient is the bf16 GEMM itself, not a float8 one
    want = grad.reshape(-1, 96).t() @ x.detach().reshape(-1, 64)
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, want)


def test_a_frozen_weight_gets_no_gradient_and_the_input_still_does():
    x, w = _problem()
    x.requires_grad_(True)
    Float8MM.apply(x, w).float().sum().backward()
    assert w.grad is None and x.grad is not None and torch.isfinite(x.grad).all()


def test_eligible_linears_convert_keeping_their_parameters():
    cfg = float8_config("bfloat16")
    model = small_model(cfg)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    apply_float8_linears(model, cfg.quantize)
    assert_default_conversion(model, Float8Linear)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    for p in after.values():
        assert type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor


def test_the_output_head_converts_when_not_excluded():
    cfg = float8_config("bfloat16", exclude="router")
    model = small_model(cfg)
    apply_float8_linears(model, cfg.quantize)
    assert type(model.output) is Float8Linear


def _gradient_errors(weight_grad: str) -> tuple[float, dict[str, float]]:
    """(relative error of the logits, of each parameter's gradient) of a float8 model with
    the output head converted against the same model in bf16 autocast."""
    cfg = float8_config(weight_grad, exclude="router")
    cfg.quantize.float8_recipe = "rowwise"  # torchao's, when weight_grad is float8
    bf16 = small_model(cfg)
    fp8 = copy.deepcopy(bf16)
    apply_float8_linears(fp8, cfg.quantize)
    tokens = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", torch.bfloat16):
        ref, out = bf16(tokens), fp8(tokens)
        assert out.dtype == ref.dtype
        ref.float().square().mean().backward()
        out.float().square().mean().backward()
    grads = dict(fp8.named_parameters())
    errors = {
        name: _relative(grads[name].grad, p.grad)
        for name, p in bf16.named_parameters()
        if p.grad is not None
    }
    assert all(grads[name].grad.dtype == torch.float32 for name in errors)
    return _relative(out, ref), errors


def test_a_float8_model_follows_the_bf16_model_as_closely_as_torchaos_rowwise():
    """Deep gradients pass through many float8 input-gradient GEMMs (~20% off on this tiny
    random model for both); torchao's rowwise recipe is the yardstick, on average over the
    parameters (one parameter's error is noise either way)."""
    logits, errors = _gradient_errors("bfloat16")
    _, torchao_errors = _gradient_errors("float8")
    assert logits < 0.1 and errors["output.weight"] < 0.1
    assert errors.keys() == torchao_errors.keys()
    mean, torchao_mean = (sum(e.values()) / len(e) for e in (errors, torchao_errors))
    assert mean <= 1.1 * torchao_mean, (errors, torchao_errors)
    assert max(errors.values()) < 0.4, errors


def test_float32_compute_keeps_float32_outputs():
    cfg = float8_config("bfloat16")
    model = small_model(cfg)
    apply_float8_linears(model, cfg.quantize)
    x = torch.randn(3, 64)
    assert model.layers["0"].attention.wq(x).dtype == torch.float32


def test_cached_weights_cover_the_float8_linears_and_torchaos_turn_them_off():
    cfg = float8_config("bfloat16")
    model = small_model(cfg)
    plain = len(CachedWeights(model, torch.bfloat16))
    apply_float8_linears(model, cfg.quantize)
    assert len(CachedWeights(model, torch.bfloat16)) == plain
    assert cached_weights_conflict(cfg) is None
    conflict = cached_weights_conflict(float8_config("float8"))
    assert conflict is not None and "float8_linear_weight_grad = 'float8'" in conflict


@needs_sm90
def test_scaled_mm_matches_the_emulation():
    x, w = _problem("cuda")
    x_q, x_f = quantize_rowwise(x.reshape(-1, 64), -1)
    w_q, w_f = quantize_rowwise(w, -1)
    args = (x_q, w_q.t(), x_f, w_f.t())
    got = torch._scaled_mm(*args, out_dtype=torch.bfloat16, use_fast_accum=True)
    assert _relative(got, emulated(*args)) < 1e-2
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = Float8MM.apply(x, w)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.T).backward(grad.double())
    assert _relative(x.grad, x64.grad) < 0.06 and _relative(w.grad, w64.grad) < 0.01


@needs_sm90
@pytest.mark.parametrize("compiled", [False, True])
def test_float8_linears_with_a_bf16_weight_gradient_train(tiny_config, compiled):
    trainer = float8_trainer(
        tiny_config,
        compiled,
        float8_linear="true",
        float8_linear_weight_grad="bfloat16",
        float8_exclude="router",
    )
    assert type(trainer.model.output) is Float8Linear
    assert trainer.cached_weights is not None  # plain weights: the bf16 copies apply
    losses = trainer.train()
    assert losses[-1] < losses[0] - 1.0, losses


def test_the_bf16_weight_gradient_linears_are_refused_without_an_sm90_gpu(tiny_config, monkeypatch):
    from torchmoe.config.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    keys = {"quantize.float8_linear": "true", "quantize.float8_linear_weight_grad": "bfloat16"}
    with pytest.raises(
        ConfigError, match=r"float8_linear_weight_grad = 'bfloat16' .*9\.0\+"
    ) as err:
        tiny_config(**keys)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("COMM_MODE", "fake")  # a dry run on a CPU may plan a GPU job
    assert tiny_config(**keys).quantize.float8_linear_weight_grad == "bfloat16"
