"""Router selection on hand-checkable cases."""

import torch

from torchmoe.models.moe.router import RouterArgs, TopKRouter


def router_with_logits(logits, **kw):
    """A router whose gate maps the one-hot token i to the given logits row i."""
    T, E = logits.shape
    r = TopKRouter(RouterArgs(dim=T, num_experts=E, **kw))
    with torch.no_grad():
        r.gate.weight.copy_(logits.T)
        if r.expert_bias is not None:
            r.expert_bias.zero_()
    return r, torch.eye(T)


def test_group_limited_routing_picks_experts_only_from_best_groups():
    # 8 experts in 4 groups of 2. Group maxima: g0=5, g1=4, g2=3.9, g3=1 -> best 2 groups: g0, g1.
    # Plain top-3 would take 5 (e0), 4 (e2), 3.9 (e4); limited to g0,g1 it takes e0, e2, e1 (3.5).
    logits = torch.tensor([[5.0, 3.5, 4.0, 0.0, 3.9, 3.8, 1.0, 0.5]])
    r, x = router_with_logits(logits, topk=3, num_groups=4, group_topk=2)
    assert sorted(r(x).topk_idx_TK[0].tolist()) == [0, 1, 2]
    r, x = router_with_logits(logits, topk=3)
    assert sorted(r(x).topk_idx_TK[0].tolist()) == [0, 2, 4]


def test_group_score_with_bias_is_sum_of_two_best():
    # sigmoid scores ~ [0.982, 0.00005 | 0.953, 0.924]. With an expert bias a group scores the
    # sum of its two best (0.98 vs 1.88), so group 1 wins although expert 0 is the best single
    # expert; without a bias the group maximum decides and expert 0 is taken.
    logits = torch.tensor([[4.0, -10.0, 3.0, 2.5]])
    kw = dict(topk=1, num_groups=2, group_topk=1, score_function="sigmoid")
    r, x = router_with_logits(logits, enable_expert_bias=True, **kw)
    assert r(x).topk_idx_TK.tolist() == [[2]]
    r, x = router_with_logits(logits, enable_expert_bias=False, **kw)
    assert r(x).topk_idx_TK.tolist() == [[0]]


def test_expert_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r, x = router_with_logits(logits, topk=1, enable_expert_bias=True, score_function="sigmoid")
    assert r(x).topk_idx_TK.tolist() == [[0]]
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # sigmoid(-1)+1 > sigmoid(2)
    out = r(x)
    assert out.topk_idx_TK.tolist() == [[3]]
    # weight is the unbiased score, not score + bias
    torch.testing.assert_close(out.topk_weight_TK, torch.sigmoid(torch.tensor([[-1.0]])))


def test_weights_renormalised_and_scaled():
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    r, x = router_with_logits(
        logits, topk=2, score_function="sigmoid", norm_topk_prob=True, scaling_factor=2.5
    )
    w = r(x).topk_weight_TK
    torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.5))


def test_router_math_stays_fp32_under_autocast():
    torch.manual_seed(0)
    r = TopKRouter(RouterArgs(dim=8, num_experts=4, topk=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(torch.randn(3, 8))
    assert out.topk_weight_TK.dtype == torch.float32
    assert out.probs_TE.dtype == torch.float32
