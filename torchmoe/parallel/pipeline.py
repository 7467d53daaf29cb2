"""Pipeline parallelism over the dense view's ``pp`` dimension (torch.distributed.pipelining):
``build_pipeline`` splits the model into stages (pipeline_layout.py says where to cut,
pipeline_stage.py what a stage is), runs each of this rank's stages through the same
parallelize plan as a whole model (TP, EP, AC, compile, FSDP over the other mesh dimensions),
and joins them in a schedule from torch. The pp_* keys' meaning and checks are in
torchmoe/config/pipeline_keys.py.
"""

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from torchmoe.config.errors import ConfigError
from torchmoe.config.pipeline_keys import SINGLE_STAGE, V_SHAPED, microbatches, stage_ids
from torchmoe.config.schema import JobConfig
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.ep_overlap import apply_ep_overlap
from torchmoe.parallel.pipeline_layout import describe_layout, stage_layout
from torchmoe.parallel.pipeline_stage import LocalStages, split_stage

logger = logging.getLogger(__name__)

# Static shapes rather than torch's runtime inference, which runs an extra forward (and, in
# newer torch, backward) that would count tokens in the MoE layers' statistics. Newer torch
# (2.13) also wants the gradients' shapes in static mode; this also tells the versions apart.
STAGES_TAKE_GRAD_SHAPES = "output_grads" in inspect.signature(PipelineStage.__init__).parameters


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
    materialize: Callable[[nn.Module], None],
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden_dtype: torch.dtype,
    logits_dtype: torch.dtype,
    positions: torch.Tensor | None = None,
) -> Pipeline:
    """Split ``model`` (meta), parallelize this rank's stages with ``plan`` and
    ``materialize(part)`` them, and build the schedule, whose
    ``loss_fn(logits, labels)`` is called per micro-batch.

    Stage inputs and outputs are given to torch statically: token ids [b, S] into the first
    stage, hidden states [b, S / (cp tp), D] (a context-parallel rank's chunks, split again
    into sequence-parallel shards; D x (1 + MTP depth) with the MTP inputs) between stages,
    logits [b, S / cp, V] out of the last. Under context parallelism every stage computes the
    rank's chunks (``positions``, given to every ``DecoderStage``) of the whole sequences the
    first one takes.
    The dtypes depend on the plan: FSDP's mixed precision casts hidden states to the parameter
    dtype, autocast keeps the residual stream in float32."""
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
    local = t.seq_len // dims.cp  # tokens of each sequence a context-parallel rank computes
    hidden = torch.empty(
        b, local // dims.tp, width, dtype=hidden_dtype, device="meta", requires_grad=True
    )
    for stage in ids:
        part = plan(split_stage(model, layout, stage), dims, cfg)
        materialize(part)
        part.positions = positions
        first, last = stage == 0, stage == len(layout) - 1
        inputs = torch.empty(b, t.seq_len, dtype=torch.long, device="meta") if first else hidden
        outputs = (
            torch.empty(b, local, cfg.model.vocab_size, dtype=logits_dtype, device="meta")
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
    if p.pp_ep_overlap:
        apply_ep_overlap(schedule, parts)
    return Pipeline(schedule, LocalStages(parts), 0 in ids, len(layout) - 1 in ids)
