"""What the [parallelism] pp_* keys mean and their cross-key checks: how many pipeline stages,
how many micro-batches, and which stages each pipeline rank holds. The pipeline itself is built
in torchmoe/parallel/pipeline.py.

Ranks hold stages in a loop (rank r: r, r + pp, ...) or, for the V-shaped schedules
(ZBVZeroBubble, DualPipeV), as a V (rank r: r and 2 pp - 1 - r, so rank 0 holds the first and
the last stage).
"""

import torch
from torch.distributed import pipelining

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig

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


def check_pipeline(cfg: JobConfig) -> None:
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


def stage_ids(pp_rank: int, pp: int, stages: int, schedule: str) -> list[int]:
    """The stages rank ``pp_rank`` of the pipeline holds."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return list(range(pp_rank, stages, pp))
