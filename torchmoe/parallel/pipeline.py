"""Pipeline parallelism over the dense view's ``pp`` dimension (torch.distributed.pipelining).

The decoder is cut between transformer blocks into ``pp x stages_per_rank`` stages: the first
keeps the embedding, the last the final norm and output head. Each stage is the model itself
with the other blocks dropped (``Decoder`` keeps its blocks in a ModuleDict keyed by index), so
parameter names do not change and checkpoints load across pipeline layouts. Every stage goes
through the same parallelize plan as a whole model (TP, EP, AC, compile, FSDP over the other
mesh dimensions), then joins a schedule from torch.

Ranks hold stages in a loop (rank r: r, r + pp, ...) or, for the V-shaped schedules
(ZBVZeroBubble, DualPipeV), as a V (rank r: r and 2 pp - 1 - r, so rank 0 holds the first and
the last stage).

Without an explicit ``pp_layout`` or ``pp_layers_per_stage`` the split balances cost, not block
count: a block's cost is the mean of its share of the model's FLOPs and its share of the
parameters, so MoE blocks (many parameters, the FLOPs of a few experts) weigh more than dense
ones, and the embedding and output head weigh on the first and last stage.
"""

import copy
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.parallel.dims import ParallelDims
from torchmoe.train.metrics import flops_per_token

logger = logging.getLogger(__name__)

# Static shapes rather than torch's runtime inference, which runs an extra forward (and, in
# newer torch, backward) that would count tokens in the MoE layers' statistics. Newer torch
# (2.13) also wants the gradients' shapes in static mode; this also tells the versions apart.
STAGES_TAKE_GRAD_SHAPES = "output_grads" in inspect.signature(PipelineStage.__init__).parameters
SINGLE_STAGE = ("GPipe", "1F1B")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


def num_stages(cfg: JobConfig) -> int:
    """Stages in the whole pipeline (see the [parallelism] pp_* keys)."""
    p = cfg.parallelism
    if p.pp_layout:
        return len(p.pp_layout)
    if p.pp_layers_per_stage:
        return cfg.model.n_layers // p.pp_layers_per_stage
    return p.pp * (p.pp_stages_per_rank or (1 if p.pp_schedule in SINGLE_STAGE else 2))


def microbatches(cfg: JobConfig) -> int:
    """Pipeline micro-batches per local batch."""
    return cfg.parallelism.pp_microbatches or cfg.training.local_batch_size


def validate_pipeline(cfg: JobConfig) -> None:
    """One ConfigError per inconsistent pp_* key, before anything is built."""
    p, n_layers = cfg.parallelism, cfg.model.n_layers
    set_keys = [
        k
        for k in ("pp_microbatches", "pp_stages_per_rank", "pp_layers_per_stage", "pp_layout")
        if getattr(p, k)
    ]
    if p.pp == 1:
        if set_keys:
            raise ConfigError(
                f"parallelism.{set_keys[0]} = {getattr(p, set_keys[0])} has no "
                "effect with parallelism.pp = 1; remove it or raise pp"
            )
        return
    if not hasattr(pipelining, f"Schedule{p.pp_schedule}"):
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} is not in this torch "
            f"({torch.__version__}); pick another schedule or upgrade torch"
        )
    if p.pp_layout and p.pp_layers_per_stage:
        raise ConfigError(
            "parallelism.pp_layout and parallelism.pp_layers_per_stage both set the split; keep one"
        )
    if p.pp_layout and (min(p.pp_layout) < 0 or sum(p.pp_layout) != n_layers):
        raise ConfigError(
            f"parallelism.pp_layout = {p.pp_layout} must list non-negative block "
            f"counts adding up to model.n_layers = {n_layers}"
        )
    if p.pp_layers_per_stage and n_layers % p.pp_layers_per_stage:
        raise ConfigError(
            f"parallelism.pp_layers_per_stage = {p.pp_layers_per_stage} does not "
            f"divide model.n_layers = {n_layers}"
        )
    stages = num_stages(cfg)
    if stages % p.pp or (p.pp_stages_per_rank and stages != p.pp * p.pp_stages_per_rank):
        source = (
            "pp_layout"
            if p.pp_layout
            else "pp_layers_per_stage"
            if p.pp_layers_per_stage
            else "pp_stages_per_rank"
        )
        raise ConfigError(
            f"parallelism.{source} gives {stages} pipeline stages, which must be "
            f"parallelism.pp = {p.pp} x parallelism.pp_stages_per_rank"
            f"{f' = {p.pp_stages_per_rank}' if p.pp_stages_per_rank else ''}"
        )
    per_rank = stages // p.pp
    if (p.pp_schedule in SINGLE_STAGE) != (per_rank == 1) or (
        p.pp_schedule in V_SHAPED and per_rank != 2
    ):
        need = (
            "1"
            if p.pp_schedule in SINGLE_STAGE
            else "2"
            if p.pp_schedule in V_SHAPED
            else "2 or more"
        )
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} runs {need} stage(s) per "
            f"rank but the layout gives {per_rank}; change pp_stages_per_rank, "
            "pp_layout or the schedule"
        )
    if not (p.pp_layout or p.pp_layers_per_stage) and stages > n_layers:
        raise ConfigError(
            f"{stages} pipeline stages (parallelism.pp x pp_stages_per_rank) but "
            f"only model.n_layers = {n_layers} blocks; use fewer stages"
        )
    m = microbatches(cfg)
    if cfg.training.local_batch_size % m:
        raise ConfigError(
            f"parallelism.pp_microbatches = {m} must divide "
            f"training.local_batch_size = {cfg.training.local_batch_size}"
        )
    # torch's rules, checked before any stage is built
    rounds = max(1, m // p.pp)
    if p.pp_schedule in ("1F1B", "DualPipeV") and m < stages:
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} needs at least one "
            f"micro-batch per stage ({stages}) but has {m} (pp_microbatches, or "
            "one per sequence of training.local_batch_size); raise them"
        )
    if p.pp_schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and m % rounds:
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} runs micro-batches in "
            f"rounds of parallelism.pp = {p.pp}: {m} micro-batches is not a "
            f"multiple of {rounds} rounds; use a multiple of pp"
        )
    for rank in range(p.pp):
        ids = stage_ids(rank, p.pp, stages, p.pp_schedule)
        if p.pp_layout and not any(p.pp_layout[s] or s in (0, stages - 1) for s in ids):
            raise ConfigError(
                f"parallelism.pp_layout = {p.pp_layout} leaves pipeline rank "
                f"{rank} (stages {ids}) without blocks; give each rank one"
            )


def unit_costs(model: nn.Module, cfg: JobConfig) -> tuple[list[float], float, float]:
    """Relative cost of each block, of the embedding and of the head (norm, output and the
    MTP depths, which run the output head again): the mean of the unit's share of the FLOPs
    per token and of the parameters."""
    blocks = list(model.layers.values())
    head = [m for m in (model.norm, model.output, model.mtp) if m is not None]
    units = [[model.tok_embeddings], *([b] for b in blocks), head]
    params = [sum(p.numel() for m in unit for p in m.parameters()) for unit in units]
    # flops_per_token skips embeddings by parameter name: the lookup costs no matmul
    flops = [0.0] + [flops_per_token(b, cfg) for b in blocks]
    flops.append(
        sum(flops_per_token(m, cfg) for m in head)
        + model.mtp_depth * flops_per_token(model.output, cfg)
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


def stage_ids(pp_rank: int, pp: int, stages: int, schedule: str) -> list[int]:
    """The stages rank ``pp_rank`` of the pipeline holds."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return list(range(pp_rank, stages, pp))


def split_stage(model: nn.Module, layout: list[int], stage: int) -> nn.Module:
    """The part of ``model`` (on the meta device) that ``stage`` runs: a copy of the model
    without the other stages' blocks, and without the embedding / head unless first / last.
    The blocks themselves are not copied: each belongs to one stage."""
    layers = model.layers
    model.layers = nn.ModuleDict()
    part = copy.deepcopy(model)
    model.layers = layers
    start = sum(layout[:stage])
    keys = list(layers.keys())[start : start + layout[stage]]
    part.layers = nn.ModuleDict({k: layers[k] for k in keys})
    if stage > 0:
        part.tok_embeddings = None
    if stage < len(layout) - 1:
        part.norm = part.output = part.mtp = None
    return part


class LocalStages(nn.Module):
    """The stages this rank holds, seen as one module with the whole model's parameter names:
    what the optimizer, checkpoints, clipping and metrics use. Forward runs through the
    schedule, stage by stage, never through this module."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = parts  # a plain list: not registered, so names carry no prefix
        blocks = {k: b for part in parts for k, b in part.layers.items()}
        self.layers = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        for name in ("tok_embeddings", "norm", "output"):
            setattr(
                self,
                name,
                next((getattr(p, name) for p in parts if getattr(p, name) is not None), None),
            )
        holder = next((p for p in parts if p.mtp is not None), None)
        self.mtp = holder.mtp if holder else None
        self.register_buffer(
            "mtp_loss_sum",
            holder.mtp_loss_sum if holder else torch.zeros((), device=parts[0].rope_cos_sin.device),
            persistent=False,
        )

    def forward(self, *args):
        raise RuntimeError("pipeline stages run through their schedule, not LocalStages")


@dataclass
class Pipeline:
    schedule: object  # a torch.distributed.pipelining schedule
    model: LocalStages
    has_first: bool  # this rank feeds the inputs
    has_last: bool  # this rank computes the loss


def build_pipeline(
    model: nn.Module,
    dims: ParallelDims,
    cfg: JobConfig,
    plan: Callable,
    materialize: Callable[[nn.Module, int], None],
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden_dtype: torch.dtype,
    logits_dtype: torch.dtype,
) -> Pipeline:
    """Split ``model`` (meta), parallelize this rank's stages with ``plan`` and
    ``materialize(part, stage)`` them, and build the schedule, whose
    ``loss_fn(logits, labels)`` is called per micro-batch.

    Stage inputs and outputs are given to torch statically: token ids [b, S] into the first
    stage, hidden states [b, S / tp, D] (sequence-parallel shards; D x (1 + MTP depth) with
    the MTP inputs) between stages, logits [b, S, V] out of the last. The dtypes depend on
    the plan: FSDP's mixed precision casts hidden states to the parameter dtype, autocast
    keeps the residual stream in float32."""
    p, t = cfg.parallelism, cfg.training
    layout = stage_layout(model, cfg)
    logger.info(
        "pipeline %s, %d micro-batches: %s",
        p.pp_schedule,
        microbatches(cfg),
        describe_layout(model, cfg, layout),
    )
    pp_mesh = dims.meshes.dense["pp"]
    if (
        p.pp_schedule in V_SHAPED
        and not STAGES_TAKE_GRAD_SHAPES
        and (torch.distributed.get_backend(pp_mesh.get_group()) == "gloo")
    ):
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} on gloo needs torch >= "
            f"2.13 (torch {torch.__version__} sends between the two stages of one "
            "rank, which gloo cannot); use NCCL, another schedule or newer torch"
        )
    ids = stage_ids(pp_mesh.get_local_rank(), p.pp, len(layout), p.pp_schedule)
    parts, stages = [], []
    b = t.local_batch_size // microbatches(cfg)
    width = cfg.model.dim * (1 + cfg.model.mtp_num_layers)
    hidden = torch.empty(
        b, t.seq_len // dims.tp, width, dtype=hidden_dtype, device="meta", requires_grad=True
    )
    for stage in ids:
        part = plan(split_stage(model, layout, stage), dims, cfg)
        materialize(part, stage)
        first, last = stage == 0, stage == len(layout) - 1
        inputs = torch.empty(b, t.seq_len, dtype=torch.long, device="meta") if first else hidden
        outputs = (
            torch.empty(b, t.seq_len, cfg.model.vocab_size, dtype=logits_dtype, device="meta")
            if last
            else hidden
        )
        grads = {}
        if STAGES_TAKE_GRAD_SHAPES:
            grads = {
                "input_grads": None if first else hidden,
                "output_grads": None if last else hidden,
            }
        stages.append(
            PipelineStage(
                part,
                stage,
                len(layout),
                device,
                input_args=inputs,
                output_args=outputs,
                group=pp_mesh.get_group(),
                **grads,
            )
        )
        parts.append(part)
    schedule_cls = getattr(pipelining, f"Schedule{p.pp_schedule}")
    try:
        schedule = schedule_cls(
            stages[0] if p.pp_schedule in SINGLE_STAGE else stages,
            n_microbatches=microbatches(cfg),
            loss_fn=loss_fn,
            scale_grads=False,
        )
    except ValueError as e:  # torch's own constraints on micro-batches and stages
        raise ConfigError(
            f"parallelism.pp_schedule = {p.pp_schedule!r} with "
            f"parallelism.pp_microbatches = {microbatches(cfg)}: {e}"
        ) from None
    return Pipeline(schedule, LocalStages(parts), 0 in ids, len(layout) - 1 in ids)
