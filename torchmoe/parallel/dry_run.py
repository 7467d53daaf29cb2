"""Dry run: plan a layout for N GPUs on one machine, with no GPU.

``COMM_MODE=fake NGPU=1024 ./run_train.sh --config ...`` joins a fake process group of that
size as rank 0, builds the real meshes, builds the model on the meta device, applies the
parallelize plan, and prints what a rank would hold: parameter, gradient and optimizer-state
bytes (from the actual shard shapes), FSDP's gathered-weight buffers, and an activation
estimate. With ``pp`` > 1 it does so for the first and the last pipeline stage (layers split
evenly; the first stage keeps the embedding, the last the norm and output head), counting the
``pp - stage`` micro-batches a 1F1B schedule keeps in flight. Validation errors are the same
one-liners as a real run's.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchmoe.config.schema import JobConfig
from torchmoe.models.moe.moe import MoE
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.dims import ParallelDims
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
    attention = (FP32 * m.dim + BF16 * m.dim + BF16 * a.n_heads * (3 * a.qk_head_dim
                 + 2 * a.v_head_dim) + FP32 * a.n_heads * a.qk_head_dim)
    ffn = block.feed_forward
    if isinstance(ffn, MoE):
        e, k = cfg.moe, cfg.moe.router_topk
        mlp = (FP32 * (2 * m.dim + 3 * e.num_experts) + BF16 * k * (3 * m.dim + 4 * e.ffn_hidden_size)
               + BF16 * (m.dim + 3 * e.shared_expert_intermediate_size))
    else:
        mlp = FP32 * m.dim + BF16 * (m.dim + 3 * m.inter_dim)
    return attention + mlp


def keep_stage(model: nn.Module, stage: int, stages: int) -> None:
    """Drop every layer, embedding or head that pipeline stage ``stage`` does not own."""
    names = list(model.layers.keys())
    per_stage = -(-len(names) // stages)
    for name in names[:stage * per_stage] + names[(stage + 1) * per_stage:]:
        del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < stages - 1:
        model.norm = model.output = None


def estimate(model: nn.Module, dims: ParallelDims, cfg: JobConfig, stage: int
             ) -> dict[str, float]:
    """Bytes a rank of pipeline stage ``stage`` holds, by kind."""
    params = [p for p in model.parameters()]
    numel = sum(_local_numel(p) for p in params)
    def unsharded_by_fsdp(block: nn.Module) -> int:
        """A block's weights as FSDP gathers them: experts stay split over ep x etp."""
        return sum(p.numel() // (dims.ep * dims.etp if ".experts." in f".{name}" else dims.tp)
                   for name, p in block.named_parameters())

    gathered = max((unsharded_by_fsdp(b) for b in model.layers.values()), default=0)
    tokens = cfg.training.local_batch_size * cfg.training.seq_len / dims.tp  # sequence parallel
    blocks = list(model.layers.values())
    per_layer = [activation_bytes_per_token(cfg, b) * tokens for b in blocks]
    ac = cfg.activation_checkpoint
    if ac.mode == "full":  # checkpointed blocks keep their input; the others everything
        kept = [FP32 * cfg.model.dim * tokens if i % ac.every_n_layers == 0 else size
                for i, size in enumerate(per_layer)]
        acts = sum(kept) + max(per_layer, default=0)
    else:  # selective frees little of what this per-token count holds: an upper bound
        acts = sum(per_layer)
    if model.output is not None:
        # logits, and the float32 copies of the eager loss (a compiled loss fuses them away)
        acts += tokens * cfg.model.vocab_size * (BF16 + (0 if cfg.compile.enable else 2 * FP32))
    acts *= dims.pp - stage  # micro-batches in flight on this stage under 1F1B
    return {"parameters (fp32)": numel * FP32, "gradients (fp32)": numel * FP32,
            "AdamW state (fp32 x2)": numel * 2 * FP32,
            "FSDP gathered weights (bf16, 2 blocks)": 2 * gathered * BF16 if dims.dp > 1 else 0,
            "activations (estimate)": acts}


def dry_run(cfg: JobConfig) -> None:
    """Print rank 0's memory under ``cfg``'s layout on ``WORLD_SIZE`` fake ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        dims = ParallelDims.from_config(cfg.parallelism, world)
        dims.check_model(cfg)
        dims.build_meshes("cpu")
        spec = get_model_spec(cfg.model.name)
        plan = load_plan(cfg.parallelism.plan) if cfg.parallelism.plan else spec.parallelize
        columns = {}
        for stage in sorted({0, dims.pp - 1}):
            with torch.device("meta"):
                model = spec.build(cfg)
            total_params = sum(p.numel() for p in model.parameters())
            keep_stage(model, stage, dims.pp)
            model = plan(model, dims, cfg)
            columns[f"stage {stage}" if dims.pp > 1 else "rank 0"] = estimate(model, dims, cfg,
                                                                                stage)
    finally:
        dist.destroy_process_group()
    d = dims
    print(f"dry run: {cfg.model.name}/{cfg.model.flavor}, {total_params / 1e9:.1f}B parameters, "
          f"{world} ranks: dp_replicate {d.dp_replicate} dp_shard {d.dp_shard} tp {d.tp} "
          f"pp {d.pp} ep {d.ep} etp {d.etp} (experts sharded over edp {d.edp}); "
          f"local batch {cfg.training.local_batch_size} x seq {cfg.training.seq_len}, "
          f"activation checkpointing {cfg.activation_checkpoint.mode}")
    print(f"{'GiB per rank':<42}" + "".join(f"{c:>10}" for c in columns))
    rows = next(iter(columns.values())).keys()
    for name in list(rows) + ["total"]:
        values = [sum(col.values()) if name == "total" else col[name] for col in columns.values()]
        print(f"{name:<42}" + "".join(f"{v / GiB:>10.2f}" for v in values))
