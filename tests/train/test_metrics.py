"""Model FLOPs, peak lookup and expert-load statistics on hand-checkable cases."""

import math

import torch

from torchmoe.config.load import build_config
from torchmoe.models.deepseek_v3.model import build_deepseek_v3
from torchmoe.train.metrics import expert_load_stats, flops_per_token, peak_flops


def test_flops_per_token_of_16b_with_4_layers():
    cfg = build_config({}, [("model.flavor", "16B"), ("model.n_layers", "4"),
                            ("training.seq_len", "4096")])
    with torch.device("meta"):
        model = build_deepseek_v3(cfg)
    d, V, H = 2048, 102400, 16
    attention_params = d * H * 192 + d * (512 + 64) + 512 * H * 256 + H * 128 * d + 512
    norms = 2 * d
    dense_ffn = 3 * d * 10944
    active_moe = (6 + 2) * 3 * d * 1408 + d * 64  # top-6 routed + 2 shared, router
    active = 4 * (attention_params + norms) + dense_ffn + 3 * active_moe + d + V * d
    expected = 6 * active + 6 * 4 * H * 4096 * (192 + 128)
    assert flops_per_token(model, cfg) == expected
    assert 3.7e9 < expected < 3.8e9  # ~245 TFLOP/s at 65.5k tokens/s, as the issue quotes


def test_peak_unknown_off_gpu():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_expert_load_stats():
    counts = torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 0.0, 6.0, 2.0]])
    stats = expert_load_stats(counts)
    assert stats["load_max_over_mean"] == 2.0  # layer 1: 8 / 4
    assert stats["dead_experts"] == 1
    cv1 = math.sqrt((16 + 16 + 4 + 4) / 4) / 4  # deviations from the mean 4: 4, -4, 2, -2
    assert abs(stats["load_cv"] - cv1 / 2) < 1e-12  # mean over layers of (0, cv1)
