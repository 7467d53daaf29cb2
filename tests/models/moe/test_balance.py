"""Balance losses and the expert-bias update on hand-checkable cases."""

import torch

from torchmoe.models.moe.balance import (
    attach_aux_loss,
    expert_counts,
    sequence_aux_loss,
    sequence_counts,
    set_aux_loss_scale,
    switch_aux_loss,
    update_expert_bias,
)


def switch(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return switch_aux_loss(probs, expert_counts(idx, probs.shape[1], probs.dtype))


def test_switch_aux_loss_hand_case():
    # 2 tokens, 2 experts, top-1: token 0 -> e0, token 1 -> e0. f = (1, 0); P = mean probs.
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)
    idx = torch.tensor([[0], [0]])
    expected = 2 * (1.0 * 0.65 + 0.0 * 0.35)
    assert abs(switch(probs, idx).item() - expected) < 1e-12


def test_switch_aux_loss_is_one_when_uniform():
    E = 4
    probs = torch.full((8, E), 1 / E, dtype=torch.float64)
    idx = torch.arange(8).remainder(E).view(8, 1)
    assert abs(switch(probs, idx).item() - 1.0) < 1e-12


def test_sequence_aux_loss_is_mean_of_per_sequence_losses():
    torch.manual_seed(0)
    B, S, E, K = 3, 5, 6, 2
    probs = torch.randn(B * S, E, dtype=torch.float64).softmax(-1)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    per_seq = [switch(probs[b * S : (b + 1) * S], idx[b * S : (b + 1) * S]) for b in range(B)]
    got = sequence_aux_loss(probs, sequence_counts(idx, B, E, probs.dtype))
    torch.testing.assert_close(got, torch.stack(per_seq).mean())


def test_expert_bias_update_hand_case():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    counts = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    update_expert_bias(bias, counts, rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.6, -0.4, 0.1]))


def test_attached_aux_loss_gets_scaled_gradient():
    w = torch.tensor(2.0, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    aux = w * w  # d aux / d w = 2w = 4
    set_aux_loss_scale(0.25)
    try:
        out = attach_aux_loss(x * 1.0, aux)
        out.sum().backward()
    finally:
        set_aux_loss_scale(1.0)
    torch.testing.assert_close(w.grad, torch.tensor(1.0))
    torch.testing.assert_close(x.grad, torch.ones(3))
