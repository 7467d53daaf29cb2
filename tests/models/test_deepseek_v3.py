"""The DeepSeek-V3 decoder: meta-device build, init determinism, causality, MLA variants."""

import pytest
import torch

from tests.models.test_model_zoo import assert_causal
from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model


def small(**overrides):
    values = {
        "model.dim": "64",
        "model.inter_dim": "96",
        "moe.ffn_hidden_size": "32",
        "training.seq_len": "16",
        **{k: str(v) for k, v in overrides.items()},
    }
    return build_config({}, list(values.items()))


def materialise(cfg, seed=0):
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=torch.device("cpu"))
    return model


def test_meta_build_then_init_is_deterministic_and_finite():
    cfg = small()
    a, b = materialise(cfg), materialise(cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
        assert torch.isfinite(p).all(), name
    assert not torch.equal(a.output.weight, materialise(cfg, seed=1).output.weight)
    tokens = torch.randint(0, 4000, (2, 16))
    assert torch.equal(a(tokens), b(tokens))


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_outputs_do_not_depend_on_future_tokens(q_lora_rank):
    model = materialise(small(**{"model.q_lora_rank": q_lora_rank}))
    assert hasattr(model.layers["0"].attention, "wq_b" if q_lora_rank else "wq")
    assert_causal(model)


def test_dense_then_moe_layers():
    model = materialise(small(**{"model.n_layers": 4, "model.n_dense_layers": 2}))
    kinds = [type(block.feed_forward).__name__ for block in model.layers.values()]
    assert kinds == ["FeedForward", "FeedForward", "MoE", "MoE"]
