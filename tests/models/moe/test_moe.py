"""The MoE layer against a naive per-token loop in float64: outputs and all gradients."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from torchmoe.models.moe.moe import MoE, MoEArgs, StepStats
from torchmoe.models.moe.router import RouterArgs


def naive_route(x_D, gate_ED, bias_E, a: RouterArgs):
    """Scores, choice and weights for one token, written as plainly as possible."""
    logits = gate_ED @ x_D
    scores = logits.softmax(-1) if a.score_function == "softmax" else logits.sigmoid()
    choice = [
        float(s.detach()) + (float(bias_E[i]) if bias_E is not None else 0.0)
        for i, s in enumerate(scores)
    ]
    allowed = list(range(len(choice)))
    if a.num_groups:
        size = len(choice) // a.num_groups
        group_scores = []
        for g in range(a.num_groups):
            members = sorted(choice[g * size : (g + 1) * size], reverse=True)
            group_scores.append(sum(members[:2]) if bias_E is not None else members[0])
        best = sorted(range(a.num_groups), key=lambda g: -group_scores[g])[: a.group_topk]
        allowed = [i for i in allowed if i // size in best]
    chosen = sorted(allowed, key=lambda i: -choice[i])[: a.topk]
    weights = torch.stack([scores[i] for i in chosen])
    if a.norm_topk_prob:
        weights = weights / weights.sum()
    return chosen, weights * a.scaling_factor


def swiglu(x, w1, w2, w3):
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def naive_moe(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    a = layer.args.router
    ex = layer.experts
    bias = layer.router.expert_bias
    outs = []
    for x in x_TD:
        chosen, weights = naive_route(x, layer.router.gate.weight, bias, a)
        y = sum(
            w * swiglu(x, ex.w13[e, 0], ex.w2[e], ex.w13[e, 1]) for e, w in zip(chosen, weights)
        )
        if layer.shared_experts is not None:
            s = layer.shared_experts
            y = y + swiglu(x, s.w1.weight, s.w2.weight, s.w3.weight)
        outs.append(y)
    return torch.stack(outs)


CASES = list(itertools.product(["softmax", "sigmoid"], [False, True], [0, 4], [False, True]))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_moe_matches_per_token_loop(case):
    score, norm, groups, bias = CASES[case]
    torch.manual_seed(case)
    D, E, K, F_ = 12, 8, 3, 10
    args = MoEArgs(
        router=RouterArgs(
            dim=D,
            num_experts=E,
            topk=K,
            score_function=score,
            norm_topk_prob=norm,
            scaling_factor=2.5,
            num_groups=groups,
            group_topk=2 if groups else 0,
            enable_expert_bias=bias,
            dtype=torch.float64,
        ),
        hidden_dim=F_,
        shared_hidden_dim=6,
        grouped_mm="loop",
    )
    layer = MoE(args).double()
    layer.init_weights(0.5, 0.3)
    if bias:
        layer.router.expert_bias.copy_(torch.randn(E) * 0.3)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    ref = naive_moe(layer, x_ref.view(-1, D)).view_as(out)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-10, msg=n)


def test_token_counts_and_aux_loss_are_recorded_once_per_forward():
    torch.manual_seed(0)
    args = MoEArgs(
        router=RouterArgs(dim=8, num_experts=4, topk=2),
        hidden_dim=8,
        balance_coeffs={"aux_loss": 0.1},
        grouped_mm="loop",
    )
    layer = MoE(args)
    layer.init_weights(0.5, 0.5)
    x = torch.randn(3, 5, 8, requires_grad=True)
    ckpt = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    ckpt.sum().backward()  # recomputes the forward inside backward
    assert layer.tokens_per_expert.sum().item() == 3 * 5 * 2
    stats = dict(zip(StepStats._fields, layer.stats.tolist()))
    assert stats["aux_loss"] > 0 and stats["tokens"] == 15 and stats["copies"] == 30
    assert stats["seq_aux_loss"] == stats["dropped"] == 0
