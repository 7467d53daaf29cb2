"""Every router and balancing option against hand-written float64 references (python loops over
tokens and experts) on fresh random inputs: score functions, softmax before/after top-k,
renormalisation, scaling, group-limited routing, expert bias, Sinkhorn, forced balance, input
jitter, z-loss, the three aux losses, and capacity dropping with both policies."""

import itertools
import math

import pytest
import torch

from torchmoe.models.moe.balance import (
    entropy_sum,
    expert_counts,
    sequence_aux_loss,
    sequence_counts,
    switch_aux_loss,
    z_loss,
)
from torchmoe.models.moe.capacity import drop_over_capacity, expert_capacity
from torchmoe.models.moe.moe import MoE, MoEArgs, StepStats
from torchmoe.models.moe.router import RouterArgs, TopKRouter, sinkhorn_log

T, D, E = 24, 12, 8
F64 = torch.float64


def make_router(seed: int, **kw) -> tuple[TopKRouter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    router = TopKRouter(RouterArgs(dim=D, num_experts=E, dtype=F64, **kw)).double()
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(E, D, generator=g, dtype=F64))
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.randn(E, generator=g, dtype=F64) * 0.3)
    return router, torch.randn(T, D, generator=g, dtype=F64)


def reference_route(x, weight, bias, a: RouterArgs) -> tuple[list, list]:
    """Per token: the chosen experts (best first) and their weights, by loops."""
    all_idx, all_w = [], []
    for t in range(x.shape[0]):
        logits = [float(x[t] @ weight[e]) for e in range(E)]
        if a.score_function == "softmax":
            z = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / z for v in logits]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        if a.num_groups:
            size = E // a.num_groups
            groups = [
                sorted(choice[g * size : (g + 1) * size], reverse=True) for g in range(a.num_groups)
            ]
            group_score = [sum(g[:2]) if bias is not None else g[0] for g in groups]
            best = sorted(range(a.num_groups), key=lambda g: -group_score[g])[: a.group_topk]
            choice = [c if e // size in best else -math.inf for e, c in enumerate(choice)]
        idx = sorted(range(E), key=lambda e: -choice[e])[: a.topk]
        if a.score_function == "softmax" and not a.pre_softmax:
            z = sum(math.exp(logits[e]) for e in idx)
            w = [math.exp(logits[e]) / z for e in idx]
        else:
            w = [scores[e] for e in idx]
        if a.norm_topk_prob:
            w = [v / sum(w) for v in w]
        all_idx.append(idx)
        all_w.append([v * a.scaling_factor for v in w])
    return all_idx, all_w


ROUTER_OPTIONS = [
    dict(
        score_function=s,
        pre_softmax=pre,
        norm_topk_prob=norm,
        scaling_factor=scale,
        num_groups=groups,
        group_topk=2 if groups else 0,
        enable_expert_bias=bias,
        topk=k,
    )
    for s, pre, norm, scale, groups, bias, k in itertools.product(
        ("softmax", "sigmoid"),
        (True, False),
        (True, False),
        (1.0, 2.5),
        (0, 4),
        (False, True),
        (1, 3),
    )
    if s == "softmax" or pre  # pre_softmax only means something for softmax
]


@pytest.mark.parametrize(
    "options", ROUTER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_router_matches_loop_reference(options):
    seed = ROUTER_OPTIONS.index(options)
    router, x = make_router(seed, **options)
    got = router(x)
    want_idx, want_w = reference_route(
        x, router.gate.weight.detach(), router.expert_bias, router.args
    )
    assert got.topk_idx_TK.tolist() == want_idx
    torch.testing.assert_close(
        got.topk_weight_TK, torch.tensor(want_w, dtype=F64), rtol=1e-10, atol=1e-12
    )
    assert torch.allclose(got.probs_TE.sum(-1), torch.ones(T, dtype=F64))


def reference_sinkhorn(logits, tol=1e-13):
    """Multiplicative Sinkhorn on exp(logits): row scales d0 and column scales d1 until the
    column scales settle; returns the balanced matrix normalised per row."""
    cost = [[math.exp(v) for v in row] for row in logits.tolist()]
    n, m = len(cost), len(cost[0])
    d0, d1 = [1.0] * n, [1.0] * m
    for _ in range(10000):
        d0 = [1 / (n * sum(d1[j] * cost[i][j] for j in range(m))) for i in range(n)]
        new = [1 / (m * sum(d0[i] * cost[i][j] for i in range(n))) for j in range(m)]
        done = max(abs(a - b) for a, b in zip(new, d1)) < tol
        d1 = new
        if done:
            break
    rows = [[d0[i] * cost[i][j] * d1[j] for j in range(m)] for i in range(n)]
    return torch.tensor([[v / sum(r) for v in r] for r in rows], dtype=F64)


def test_sinkhorn_converges_to_the_balanced_assignment():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=g, dtype=F64) * 2
    torch.testing.assert_close(
        sinkhorn_log(logits, iters=300).exp(), reference_sinkhorn(logits), rtol=1e-9, atol=1e-12
    )


def test_sinkhorn_routing_balances_skewed_logits_in_training_only():
    router, x = make_router(6, topk=2, score_function="softmax", sinkhorn=True)
    with torch.no_grad():
        router.gate.weight[0] += 3 * x.mean(0) / x.mean(0).norm()  # expert 0 attracts all
    router.train()
    balanced = router(x)
    want = sinkhorn_log(x @ router.gate.weight.T).topk(2, dim=-1).indices
    assert torch.equal(balanced.topk_idx_TK, want)
    router.eval()
    plain = router(x)
    assert torch.equal(plain.topk_idx_TK, (x @ router.gate.weight.T).topk(2, dim=-1).indices)
    load = [expert_counts(r.topk_idx_TK, E, F64).max() for r in (balanced, plain)]
    assert load[0] < load[1]
    # weights are the chosen experts' scores either way
    torch.testing.assert_close(
        balanced.topk_weight_TK, balanced.probs_TE.gather(1, balanced.topk_idx_TK)
    )


def test_forced_balance_is_round_robin_and_keeps_gradients():
    router, x = make_router(7, topk=3, force_load_balance=True)
    out = router(x)
    assert out.topk_idx_TK.flatten().tolist() == [c % E for c in range(T * 3)]
    assert expert_counts(out.topk_idx_TK, E, F64).tolist() == [T * 3 / E] * E
    out.topk_weight_TK.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_input_jitter_multiplies_inputs_in_training_only():
    eps = 0.1
    router, x = make_router(8, topk=2, input_jitter_eps=eps)
    torch.manual_seed(11)
    noisy = router(x).logits_TE
    torch.manual_seed(11)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(noisy, (x * noise) @ router.gate.weight.T)
    assert not torch.allclose(noisy, x @ router.gate.weight.T)
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, x @ router.gate.weight.T)


def test_z_loss_and_entropy_match_loops():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(T, E, generator=g, dtype=F64) * 3
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    assert abs(z_loss(logits).item() - want) < 1e-12
    probs = logits.softmax(-1)
    want_h = -sum(p * math.log(p) for row in probs.tolist() for p in row)
    assert abs(entropy_sum(probs).item() - want_h) < 1e-12


def loop_switch(probs, idx) -> float:
    """E * sum_i (share of copies routed to i) * (mean probability of i)."""
    n, k = idx.shape
    share = [sum(int(v == e) for v in idx.flatten().tolist()) / (n * k) for e in range(E)]
    mean_p = [sum(probs[t, e].item() for t in range(n)) / n for e in range(E)]
    return E * sum(s * p for s, p in zip(share, mean_p))


def random_routing_inputs(seed: int, tokens: int = T, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(tokens, E, generator=g, dtype=F64).softmax(-1)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    return probs, idx


def test_aux_losses_match_loops():
    probs, idx = random_routing_inputs(10)
    got = switch_aux_loss(probs, expert_counts(idx, E, F64)).item()
    assert abs(got - loop_switch(probs, idx)) < 1e-12
    B = 4
    S = T // B
    want_seq = (
        sum(loop_switch(probs[b * S : (b + 1) * S], idx[b * S : (b + 1) * S]) for b in range(B)) / B
    )
    counts = sequence_counts(idx, B, E, F64)
    assert abs(sequence_aux_loss(probs, counts).item() - want_seq) < 1e-12


def test_global_aux_loss_averaged_over_shards_is_the_whole_batch_loss():
    probs, idx = random_routing_inputs(12)
    halves = [(probs[: T // 2], idx[: T // 2]), (probs[T // 2 :], idx[T // 2 :])]
    global_counts = sum(expert_counts(i, E, F64) for _, i in halves)
    per_shard = [switch_aux_loss(p, global_counts) for p, _ in halves]
    local = [switch_aux_loss(p, expert_counts(i, E, F64)) for p, i in halves]
    whole = loop_switch(probs, idx)
    assert abs(sum(per_shard).item() / 2 - whole) < 1e-12
    assert abs(sum(local).item() / 2 - whole) > 1e-6  # the local variant is another objective


def loop_drop(idx, weight, capacity: int, policy: str) -> list:
    """Each expert keeps its first ``capacity`` copies in the policy's order."""
    n, k = idx.shape
    kept = [[-1] * k for _ in range(n)]
    for e in range(E):
        copies = [(t, j) for t in range(n) for j in range(k) if idx[t, j] == e]
        if policy == "probs":
            copies.sort(key=lambda c: -weight[c[0], c[1]].item())  # stable: ties by position
        for t, j in copies[:capacity]:
            kept[t][j] = e
    return kept


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5])
def test_drop_over_capacity_matches_loop(policy, factor):
    g = torch.Generator().manual_seed(int(factor * 10))
    logits = torch.randn(T, E, generator=g, dtype=F64)
    logits[:, 0] += 2  # expert 0 is over capacity
    weight, idx = logits.softmax(-1).topk(3, dim=-1)
    capacity = expert_capacity(idx.numel(), E, factor)
    assert capacity == math.ceil(factor * T * 3 / E)
    got = drop_over_capacity(idx, weight, E, capacity, policy)
    assert got.tolist() == loop_drop(idx, weight, capacity, policy)
    assert (got < 0).any()
    assert expert_counts(got.clamp_min(0)[got >= 0].view(-1, 1), E, F64).max() <= capacity


def reference_moe_output(layer: MoE, x_TD, idx_TK, weight_TK):
    """Loops: each token sums its kept experts' SwiGLU outputs, weighted (no shared experts)."""
    (w1, w3), w2 = layer.experts.w13.unbind(1), layer.experts.w2
    rows = []
    for t in range(x_TD.shape[0]):
        out = torch.zeros(x_TD.shape[1], dtype=F64)
        for j, e in enumerate(idx_TK[t].tolist()):
            if e >= 0:
                h = torch.nn.functional.silu(w1[e] @ x_TD[t]) * (w3[e] @ x_TD[t])
                out = out + weight_TK[t, j] * (w2[e] @ h)
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("policy,pad", [("probs", False), ("position", False), ("probs", True)])
def test_moe_layer_drops_over_capacity_and_counts(policy, pad):
    torch.manual_seed(13)
    args = MoEArgs(
        router=RouterArgs(dim=D, num_experts=E, topk=2, dtype=F64),
        hidden_dim=6,
        capacity_factor=0.75,
        drop_policy=policy,
        pad_to_capacity=pad,
        grouped_mm="loop",
    )
    layer = MoE(args).double()
    layer.init_weights(0.5, 0.5)
    with torch.no_grad():
        layer.router.gate.weight[1] += 1.0  # skew the load so capacity binds
    groups = []
    layer.experts.register_forward_pre_hook(lambda m, a: groups.append(a[1].tolist()))
    x = torch.randn(2, T // 2, D, dtype=F64)
    out = layer(x).view(T, D)
    routing = layer.router(x.view(T, D))
    capacity = expert_capacity(T * 2, E, 0.75)
    kept = drop_over_capacity(routing.topk_idx_TK, routing.topk_weight_TK, E, capacity, policy)
    want = reference_moe_output(layer, x.view(T, D), kept, routing.topk_weight_TK)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    stats = dict(zip(StepStats._fields, layer.stats.tolist()))
    assert stats["dropped"] == (kept < 0).sum().item() > 0 and stats["copies"] == 2 * T
    if pad:
        assert groups == [[capacity] * E]
    else:
        assert (
            groups[0]
            == expert_counts(kept.clamp_min(0)[kept >= 0].view(-1, 1), E, F64).long().tolist()
        )
