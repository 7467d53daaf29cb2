"""float8 grouped-GEMM experts through torchao: the conversion, and (GPU) accuracy and training."""

import copy

import pytest
import torch

from tests.quant.sm90 import needs_sm90
from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.models.moe.moe import MoE, MoEArgs
from torchmoe.models.moe.router import RouterArgs
from torchmoe.quant.float8 import apply_float8_experts


def _quantize(**overrides: str):
    return build_config({}, [("quantize.float8_experts", "true"), *overrides.items()]).quantize


def _moe_layer(dim: int = 256, hidden: int = 512, experts: int = 8) -> MoE:
    args = MoEArgs(
        RouterArgs(dim=dim, num_experts=experts, topk=2),
        hidden_dim=hidden,
        shared_hidden_dim=hidden,
        grouped_mm="grouped_mm",
    )
    layer = MoE(args)
    layer.init_weights(0.02, 0.02)
    return layer


def test_conversion_wraps_expert_weights_and_pads_groups():
    from torchao.prototype.moe_training.tensor import Float8TrainingWeightWrapperTensor

    layer = _moe_layer()
    apply_float8_experts(layer, _quantize())
    for w in (layer.experts.w13, layer.experts.w2):
        assert isinstance(w.data, Float8TrainingWeightWrapperTensor)
    assert not isinstance(layer.router.gate.weight.data, Float8TrainingWeightWrapperTensor)
    assert not isinstance(layer.shared_experts.w1.weight.data, Float8TrainingWeightWrapperTensor)
    assert layer.dispatcher.pad_multiple == 16


@needs_sm90
def test_float8_layer_is_close_to_bf16_and_backpropagates():
    torch.manual_seed(0)
    bf16 = _moe_layer(dim=1024, hidden=1024, experts=16).cuda().to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    apply_float8_experts(fp8, _quantize())
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref, out = bf16(x), fp8(x)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.1, rel
    grad = torch.randn_like(out)
    ref.backward(grad)
    out.backward(grad)
    w13_ref, w13 = bf16.experts.w13.grad.float(), fp8.experts.w13.grad.float()
    assert torch.isfinite(w13).all()
    assert (w13 - w13_ref).norm() / w13_ref.norm() < 0.2


@needs_sm90
def test_float8_experts_train(tiny_config):
    from torchmoe.train.trainer import Trainer

    cfg = tiny_config(
        **{
            "quantize.float8_experts": "true",
            "training.steps": 30,
            "model.dim": 128,
            "moe.ffn_hidden_size": 128,
            "training.seq_len": 64,
        }
    )
    losses = Trainer(cfg, device=torch.device("cuda")).train()
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"moe.grouped_mm": "loop"}, "set moe.grouped_mm = 'auto' or 'grouped_mm'"),
        ({"moe.ffn_hidden_size": "40"}, "per-rank expert hidden size 40"),
    ],
)
def test_bad_float8_expert_settings_are_one_line(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        tiny_config(**{"quantize.float8_experts": "true", **overrides})
    assert "\n" not in str(err.value)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU"
)
def test_float8_experts_refused_without_a_gpu(tiny_config):
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU of compute capability 9.0"):
        tiny_config(**{"quantize.float8_experts": "true"})
