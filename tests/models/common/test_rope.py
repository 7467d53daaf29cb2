"""Rotary embeddings: relative-position property and YaRN's frequency blend."""

import math

import torch

from torchmoe.models.common.rope import (
    RopeArgs,
    apply_rope,
    inverse_frequencies,
    rope_cos_sin,
    yarn_softmax_mscale,
)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    args = RopeArgs(head_dim=16)
    cs = rope_cos_sin(args, 64)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16).expand(1, 64, 1, 16).clone(), cs)[0, m, 0]
        kn = apply_rope(k.view(1, 1, 1, 16).expand(1, 64, 1, 16).clone(), cs)[0, n, 0]
        return (qm * kn).sum().item()

    assert abs(score(10, 3) - score(40, 33)) < 1e-4
    assert abs(score(10, 3) - score(10, 4)) > 1e-3


def test_rotation_preserves_norm():
    torch.manual_seed(1)
    x = torch.randn(2, 32, 3, 8)
    y = apply_rope(x, rope_cos_sin(RopeArgs(head_dim=8), 32))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_yarn_keeps_high_and_scales_low_frequencies():
    base = RopeArgs(head_dim=64)
    yarn = RopeArgs(head_dim=64, factor=40.0, original_seq_len=4096)
    f0, f1 = inverse_frequencies(base), inverse_frequencies(yarn)
    torch.testing.assert_close(f1[:4], f0[:4])  # fast-rotating pairs unchanged
    torch.testing.assert_close(f1[-4:], f0[-4:] / 40.0)  # slow pairs interpolated
    assert yarn_softmax_mscale(base) == 1.0
    assert abs(yarn_softmax_mscale(yarn) - (0.1 * math.log(40) + 1) ** 2) < 1e-12
