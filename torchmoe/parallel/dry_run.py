"""Dry run: plan a layout for N GPUs on one machine, with no GPU.

``COMM_MODE=fake NGPU=1024 ./run_train.sh --config ...`` joins a fake process group of that
size as rank 0, builds the real meshes, builds the model on the meta device, applies the
parallelize plan, and prints what a rank would hold: parameter, gradient and optimizer-state
bytes (from the actual shard shapes), FSDP's gathered-weight buffers, and an activation
estimate. With ``pp`` > 1 it splits the model as training would (the same stage layout,
printed) and does so for each pipeline rank's stages, counting the micro-batches its schedule
keeps in flight there. Validation errors are the same one-liners as a real run's.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchmoe.config.pipeline_keys import microbatches, stage_ids
from torchmoe.config.registry import build_model, get_model_spec
from torchmoe.config.schema import JobConfig
from torchmoe.config.validate import check_cached_weights
from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.activation_checkpoint import check_recompute_modules
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.pipeline_layout import describe_layout, stage_layout
from torchmoe.parallel.pipeline_stage import split_stage
from torchmoe.parallel.plans import load_plan

GiB = 2**30
BF16, FP32 = 2, 4


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def activation_bytes_per_token(cfg: JobConfig, block: nn.Module) -> float:
    """Tensors one block saves for backward, per token, with bf16 compute (an estimate:
    residual-stream inputs in fp32, every matmul input and output in bf16)."""
    m, a = cfg.model, block.attention
    # norm input (fp32), projection input, q, k, v (repeated per head), rotary parts in fp32,
    # attention output and the output projection's input
    attention = (
        FP32 * m.dim
        + BF16 * m.dim
        + BF16 * a.n_heads * (3 * a.qk_head_dim + 2 * a.v_head_dim)
        + FP32 * a.n_heads * a.qk_head_dim
        # context parallelism keeps the keys and values gathered from the other cp ranks
        + (cfg.parallelism.cp - 1) * BF16 * a.n_heads * (a.qk_head_dim + a.v_head_dim)
    )
    ffn = block.feed_forward
    if isinstance(ffn, MoE):
        e = cfg.moe
        mlp = (
            FP32 * (2 * m.dim + 3 * e.num_experts)
            + BF16 * expert_rows_per_token(cfg) * (3 * m.dim + 4 * e.ffn_hidden_size)
            + BF16 * (m.dim + 3 * e.shared_expert_intermediate_size)
        )
    else:
        mlp = FP32 * m.dim + BF16 * (m.dim + 3 * m.inter_dim)
    return attention + mlp


def expert_rows_per_token(cfg: JobConfig) -> float:
    """Rows of the experts' buffers per token of the rank: its top-k copies, but under expert
    parallelism the sync-free dispatcher's fixed blocks, one per expert: the capacity when the
    layer pads to it (cf x k rows per token), else every token for every expert (E)."""
    e, k = cfg.moe, cfg.moe.router_topk
    if e.dispatcher != "sync_free" or cfg.parallelism.ep == 1:
        return k
    if e.capacity_factor > 0 and e.pad_to_capacity:
        return min(e.capacity_factor * k, e.num_experts)
    return e.num_experts


def in_flight(schedule: str, pp: int, pp_rank: int, stages_per_rank: int, m: int) -> int:
    """Micro-batches of one stage whose activations rank ``pp_rank`` holds at its peak: all of
    them under GPipe / LoopedBFS (every forward before any backward), ``pp - rank`` under
    1F1B, and torch's warm-up count plus one for the interleaved and V-shaped schedules (an
    estimate for the zero-bubble ones, which also delay weight gradients)."""
    if pp == 1:
        return 1
    if schedule in ("GPipe", "LoopedBFS"):
        return m * stages_per_rank
    if schedule == "1F1B":
        return min(m, pp - pp_rank)
    return min(m * stages_per_rank, (stages_per_rank - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)


def stage_activations(
    part: nn.Module, dims: ParallelDims, cfg: JobConfig, tokens: float
) -> tuple[float, float]:
    """Bytes one micro-batch of ``tokens`` (per rank) leaves in ``part`` until its backward,
    and the bytes one recomputed block adds while it runs backward."""
    per_layer = [activation_bytes_per_token(cfg, b) * tokens for b in part.layers.values()]
    ac = cfg.activation_checkpoint
    if ac.mode == "full":  # checkpointed blocks keep their input; the others everything
        stored = sum(
            FP32 * cfg.model.dim * tokens if int(key) % ac.every_n_layers == 0 else size
            for key, size in zip(part.layers.keys(), per_layer)
        )
        recompute = max(per_layer, default=0)
    else:  # selective recompute and offloading free part of this per-token count: an upper bound
        stored, recompute = sum(per_layer), 0.0
    if part.output is not None:
        # logits, and the float32 copies of the eager loss (a compiled loss fuses them away)
        stored += tokens * cfg.model.vocab_size * (BF16 + (0 if cfg.compile.enable else 2 * FP32))
    return stored, recompute


def estimate(
    parts: list[nn.Module], dims: ParallelDims, cfg: JobConfig, pp_rank: int
) -> dict[str, float]:
    """Bytes a rank holding the planned pipeline stages ``parts`` holds, by kind (one part,
    the whole model, without pipeline parallelism)."""
    numel = sum(_local_numel(p) for part in parts for p in part.parameters())

    def unsharded_by_fsdp(block: nn.Module) -> int:
        """A block's weights as FSDP gathers them: experts stay split over ep x etp."""
        return sum(
            p.numel() // (dims.ep * dims.etp if ".experts." in f".{name}" else dims.tp)
            for name, p in block.named_parameters()
        )

    gathered = max(
        (unsharded_by_fsdp(b) for part in parts for b in part.layers.values()), default=0
    )
    m = microbatches(cfg) if dims.pp_enabled else 1
    # each rank holds 1 / cp of every sequence, and sequence parallelism splits that by tp
    tokens = cfg.training.local_batch_size / m * cfg.training.seq_len / (dims.cp * dims.tp)
    stored, recompute = zip(*(stage_activations(part, dims, cfg, tokens) for part in parts))
    flight = in_flight(cfg.parallelism.pp_schedule, dims.pp, pp_rank, len(parts), m)
    fsdp_sharded = dims.dp * dims.cp > 1  # FSDP shards dense weights over dp x cp
    fsdp = 2 * gathered * BF16 if fsdp_sharded else 0
    if fsdp_sharded and dims.pp_enabled:  # torch keeps a stage's weights gathered and its
        # gradients unsharded (fp32 reduce dtype) until the step's last micro-batch
        fsdp = sum(unsharded_by_fsdp(part) for part in parts) * (BF16 + FP32)
    return {
        "params": numel * FP32,
        "grads": numel * FP32,
        "AdamW": numel * 2 * (BF16 if cfg.optimizer.state_dtype == "bfloat16" else FP32),
        "FSDP-buf": fsdp,
        "activations": flight * sum(stored) / len(stored) + max(recompute),
    }


def dry_run(cfg: JobConfig) -> None:
    """Print the memory of a rank of every pipeline position under ``cfg``'s layout on
    ``WORLD_SIZE`` fake ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_cached_weights(cfg, world)  # as the real run would refuse it
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        dims = ParallelDims.from_config(cfg.parallelism, world)
        dims.build_meshes("cpu")
        plan = load_plan(cfg.parallelism.plan or get_model_spec(cfg.model.name).plan)
        with torch.device("meta"):
            model = build_model(cfg)
        total_params = sum(p.numel() for p in model.parameters())
        check_recompute_modules(model, cfg.activation_checkpoint)
        rows, pipeline = {}, ""
        if not dims.pp_enabled:
            rows["rank 0"] = estimate([plan(model, dims, cfg)], dims, cfg, 0)
        else:
            layout = stage_layout(model, cfg)
            pipeline = (
                f"pipeline {cfg.parallelism.pp_schedule}, {microbatches(cfg)} "
                f"micro-batches: {describe_layout(model, cfg, layout)}"
            )
            parts = [plan(split_stage(model, layout, s), dims, cfg) for s in range(len(layout))]
            for r in range(dims.pp):
                ids = stage_ids(r, dims.pp, len(layout), cfg.parallelism.pp_schedule)
                name = (
                    f"pp rank {r} (stage{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"
                )
                rows[name] = estimate([parts[s] for s in ids], dims, cfg, r)
    finally:
        dist.destroy_process_group()
    d = dims
    print(
        f"dry run: {cfg.model.name}/{cfg.model.flavor}, {total_params / 1e9:.1f}B parameters, "
        f"{world} ranks: dp_replicate {d.dp_replicate} dp_shard {d.dp_shard} cp {d.cp} tp {d.tp} "
        f"pp {d.pp} ep {d.ep} etp {d.etp} (experts sharded over edp {d.edp}); "
        f"local batch {cfg.training.local_batch_size} x seq {cfg.training.seq_len}, "
        f"activation checkpointing {cfg.activation_checkpoint.mode}"
    )
    if pipeline:
        print(pipeline)
    print(
        "columns: fp32 parameters, fp32 gradients, AdamW's two moments (optimizer.state_dtype), "
        "FSDP's gathered "
        "bf16 weights of two blocks (under pp: of all the rank's stages, and their unsharded "
        "fp32 gradients), activations (estimate), total"
    )
    width = max(len(name) for name in rows) + 2
    kinds = list(next(iter(rows.values())))
    print(f"{'GiB per rank':<{width}}" + "".join(f"{k:>12}" for k in kinds + ["total"]))
    for name, row in rows.items():
        values = list(row.values()) + [sum(row.values())]
        print(f"{name:<{width}}" + "".join(f"{v / GiB:>12.2f}" for v in values))
