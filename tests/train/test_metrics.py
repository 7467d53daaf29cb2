"""Model FLOPs, peak lookup and expert-load statistics on hand-checkable cases."""

import math

import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.models.flops import flops_per_token
from torchmoe.train.metrics import peak_flops
from torchmoe.train.moe_stats import expert_load_stats


def test_flops_per_token_of_16b_with_4_layers():
    cfg = build_config(
        {}, [("model.flavor", "16B"), ("model.n_layers", "4"), ("training.seq_len", "4096")]
    )
    with torch.device("meta"):
        model = build_model(cfg)
    d, V, H = 2048, 102400, 16
    attention_params = d * H * 192 + d * (512 + 64) + 512 * H * 256 + H * 128 * d + 512
    norms = 2 * d
    dense_ffn = 3 * d * 10944
    active_moe = (6 + 2) * 3 * d * 1408 + d * 64  # top-6 routed + 2 shared, router
    active = 4 * (attention_params + norms) + dense_ffn + 3 * active_moe + d + V * d
    expected = 6 * active + 6 * 4 * H * 4096 * (192 + 128)
    assert flops_per_token(model, cfg.training.seq_len) == expected
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


def test_step_values_normalise_per_shard_and_per_token():
    from torchmoe.models.moe.moe import StepStats
    from torchmoe.train.moe_stats import ReducedStep, step_values

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (2, 4), generator=g).float()
    raw = torch.rand(2, len(StepStats._fields), generator=g, dtype=torch.float64) + 1
    bias_norm = torch.rand(2, generator=g)
    mtp = torch.rand((), generator=g)
    step = ReducedStep(counts, StepStats.unpack(raw), mtp)
    out = step_values(step, shards=4, bias_norm_L=bias_norm)
    col = {n: raw[:, i] for i, n in enumerate(StepStats._fields)}
    torch.testing.assert_close(out["z_loss"], col["z_loss"] / 4)
    torch.testing.assert_close(out["global_aux_loss"], col["global_aux_loss"] / 4)
    torch.testing.assert_close(out["entropy"], col["entropy_sum"] / col["tokens"])
    torch.testing.assert_close(out["dropped_frac"], col["dropped"] / col["copies"])
    assert out["bias_norm"] is bias_norm
    assert out["tokens"] is counts
    torch.testing.assert_close(out["mtp_loss"], mtp / 4)


def test_log_line_and_row_carry_per_layer_moe_values(tiny_config, caplog):
    import json
    import logging

    from torchmoe.train.trainer import Trainer

    cfg = tiny_config(
        **{
            "training.steps": 2,
            "moe.capacity_factor": 0.5,
            "moe.load_balancing_type": "seq_aux_loss,global_aux_loss",
            "moe.aux_loss_coeff": "0.01,0.02",
            "moe.z_loss_coeff": 0.001,
        }
    )
    with caplog.at_level(logging.INFO):
        Trainer(cfg).train()
    rows = [json.loads(line) for line in open(f"{cfg.job.dump_folder}/metrics.jsonl")]
    last = rows[-1]
    layers = last["per_layer"]
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    for key in (
        "seq_aux_loss",
        "global_aux_loss",
        "z_loss",
        "entropy",
        "dropped_frac",
        "bias_norm",
        "cv",
        "max_over_mean",
    ):
        assert len(layers[key]) == n_moe, key
    assert "aux_loss" not in layers  # not configured, so not logged
    assert all(0 < d < 1 for d in layers["dropped_frac"])
    assert all(0 < h <= math.log(cfg.moe.num_experts) for h in layers["entropy"])
    total = sum(layers["seq_aux_loss"]) + sum(layers["global_aux_loss"]) + sum(layers["z_loss"])
    assert abs(last["aux_loss"] - total) < 1e-9
    assert "dropped" in caplog.text and "entropy" in caplog.text
