"""Where a pipeline cuts the decoder: a cost model of its units and the split that balances it.
Pure functions of the model's shape and the config; no distribution (tests run them alone).

Without an explicit ``pp_layout`` or ``pp_layers_per_stage`` the split balances cost, not block
count: a block's cost is the mean of its share of the model's FLOPs and its share of the
parameters, so MoE blocks (many parameters, the FLOPs of a few experts) weigh more than dense
ones, and the embedding and output head weigh on the first and last stage. With several stages
per rank, a local search then balances the ranks (a rank's load is the sum of its stages').
"""

import itertools

from torch import nn

from torchmoe.config.pipeline_keys import num_stages, stage_ids
from torchmoe.config.schema import JobConfig
from torchmoe.models.flops import flops_per_token


def unit_costs(model: nn.Module, cfg: JobConfig) -> tuple[list[float], float, float]:
    """Relative cost of each block, of the embedding and of the head (norm, output and the
    MTP depths, which run the output head again): the mean of the unit's share of the FLOPs
    per token and of the parameters."""
    seq_len = cfg.training.seq_len
    blocks = list(model.layers.values())
    head = [m for m in (model.norm, model.output, model.mtp) if m is not None]
    units = [[model.tok_embeddings], *([b] for b in blocks), head]
    params = [sum(p.numel() for m in unit for p in m.parameters()) for unit in units]
    # flops_per_token skips embeddings by parameter name: the lookup costs no matmul
    flops = [0.0] + [flops_per_token(b, seq_len) for b in blocks]
    flops.append(
        sum(flops_per_token(m, seq_len) for m in head)
        + model.mtp_depth * flops_per_token(model.output, seq_len)
    )
    costs = [(f / sum(flops) + n / sum(params)) / 2 for f, n in zip(flops, params)]
    return costs[1:-1], costs[0], costs[-1]


def balanced_split(
    costs: list[float], stages: int, first: float = 0.0, last: float = 0.0
) -> list[int]:
    """Blocks per stage, at least one each, that minimise the costliest stage, the first
    stage also paying ``first`` and the last ``last`` (dynamic programming over prefixes)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: lowest costliest-stage cost of blocks [0, i) in s + 1 stages; cut[s][i] the
    # start of the last of them
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = first + prefix[i] + (last if stages == 1 else 0.0)
    for s in range(1, stages):
        extra = last if s == stages - 1 else 0.0
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, end = [], n
    for s in range(stages - 1, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    return [end] + counts[::-1]


def stage_layout(model: nn.Module, cfg: JobConfig) -> list[int]:
    """Blocks of each stage: ``pp_layout``, ``pp_layers_per_stage``, or the cost split."""
    p = cfg.parallelism
    if p.pp_layout:
        return list(p.pp_layout)
    if p.pp_layers_per_stage:
        return [p.pp_layers_per_stage] * num_stages(cfg)
    costs, first, last = unit_costs(model, cfg)
    stages = num_stages(cfg)
    counts = balanced_split(costs, stages, first, last)
    if stages == p.pp:
        return counts
    owner = {s: r for r in range(p.pp) for s in stage_ids(r, p.pp, stages, p.pp_schedule)}
    return balance_ranks(counts, costs, first, last, [owner[s] for s in range(stages)])


def stage_costs(counts: list[int], costs: list[float], first: float, last: float) -> list[float]:
    """Each stage's cost under the split ``counts``."""
    out, start = [], 0
    for count in counts:
        out.append(sum(costs[start : start + count]))
        start += count
    out[0] += first
    out[-1] += last
    return out


def rank_loads(
    counts: list[int], costs: list[float], first: float, last: float, owner: list[int]
) -> list[float]:
    """Each rank's cost: the sum of its stages' (``owner[stage]`` is the stage's rank)."""
    loads = [0.0] * (max(owner) + 1)
    for rank, cost in zip(owner, stage_costs(counts, costs, first, last)):
        loads[rank] += cost
    return loads


def balance_ranks(
    counts: list[int], costs: list[float], first: float, last: float, owner: list[int]
) -> list[int]:
    """With several stages per rank (``owner[stage]`` is its rank) a rank's load is the sum of
    its stages: take one block from a stage and give one to another (the blocks between shift
    by one stage) while that lowers the busiest rank's load, then the sum of squared loads
    (a local search from the per-stage split). Every stage keeps a block."""

    def score(c: list[int]) -> tuple[float, float]:
        loads = rank_loads(c, costs, first, last, owner)
        return round(max(loads), 12), round(sum(x * x for x in loads), 12)

    best = score(counts)
    improved = True
    while improved:
        improved = False
        for src, dst in itertools.permutations(range(len(counts)), 2):
            if counts[src] > 1:
                trial = list(counts)
                trial[src] -= 1
                trial[dst] += 1
                if (trial_score := score(trial)) < best:
                    counts, best, improved = trial, trial_score, True
    return counts


def describe_layout(model: nn.Module, cfg: JobConfig, layout: list[int]) -> str:
    """One line: each stage's blocks and cost share, e.g. 'stage 0: embedding + blocks 0-2
    (31%)'."""
    parts, start = [], 0
    for stage, (count, cost) in enumerate(
        zip(layout, stage_costs(layout, *unit_costs(model, cfg)))
    ):
        what = [
            f"blocks {start}-{start + count - 1}"
            if count > 1
            else f"block {start}"
            if count
            else "no blocks"
        ]
        if stage == 0:
            what.insert(0, "embedding")
        if stage == len(layout) - 1:
            what.append("head")
        parts.append(f"stage {stage}: {' + '.join(what)} ({100 * cost:.0f}%)")
        start += count
    return "; ".join(parts)
