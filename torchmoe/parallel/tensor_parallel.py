"""apply_tp: tensor parallelism with sequence parallelism over the dense view's ``tp`` dim.

Between blocks the residual stream is sequence-sharded (each rank holds its ``Shard(1)`` part as a
plain tensor); norms run on their shard (``SequenceParallel``). Attention all-gathers the sequence,
projects queries and keys / values for its local heads (column-parallel ``wq``/``wq_b``/``wkv_b``;
the small shared projections ``wq_a``/``wkv_a`` and their norms stay replicated as DTensors so their
gradients sum over heads), runs the attention kernel (``core_attention``) on local heads, and
reduce-scatters through the row-parallel ``wo``; GQA splits query and key/value heads alike. Dense
SwiGLUs are column/row parallel the same way. The output head is column parallel and the loss runs
vocabulary-parallel (``loss_parallel``).

MoE layers keep their sequence shard: each tp rank routes only its own tokens, so experts never
see a token twice. The router, shared experts and (without expert parallelism) the experts are
replicated over ``tp`` but see different tokens on each tp rank; the FSDP plan therefore shards
them over data-parallel x tp ranks, which also sums their gradients over ``tp``.
"""

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchmoe.models.common.attention import GQA
from torchmoe.models.moe.moe import MoE


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over the mesh as DTensors; inputs and outputs stay DTensors, so
    gradients coming from sharded consumers are summed by DTensor's autograd."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh)  # default: replicate every parameter


def _attention_projections(attention: nn.Module) -> dict[str, ParallelStyle]:
    """Head-parallel projections of MLA or GQA; outputs stay DTensors until the kernel."""
    heads = ColwiseParallel(use_local_output=False)
    if isinstance(attention, GQA):
        plan = {f"attention.{n}": heads for n in ("wq", "wk", "wv")}
        if attention.args.qk_norm:  # per-head norms over head_dim: the heads stay sharded
            plan.update(
                {"attention.q_norm": ReplicateParallel(), "attention.k_norm": ReplicateParallel()}
            )
        return plan
    plan = {
        "attention.wkv_a": ReplicateParallel(),
        "attention.kv_norm": ReplicateParallel(),
        "attention.wkv_b": heads,
    }
    if attention.args.q_lora_rank == 0:
        plan["attention.wq"] = heads
    else:
        plan.update(
            {
                "attention.wq_a": ReplicateParallel(),
                "attention.q_norm": ReplicateParallel(),
                "attention.wq_b": heads,
            }
        )
    return plan


def _on_local_heads(kernel, *qkv: torch.Tensor) -> torch.Tensor:
    """``kernel`` on the local heads of head-sharded (``Shard(2)``) q, k, v DTensors; its
    output, a plain tensor, feeds the row-parallel ``wo``."""
    return kernel(*(t.to_local() if isinstance(t, DTensor) else t for t in qkv))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Tensor + sequence parallelism over ``tp_mesh`` (the dense view's ``tp`` dimension) for
    the embedding, every block's attention, norms and dense SwiGLU, the MoE layers' input and
    output layouts, the final norm and the output head."""
    outer = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        ),
    }  # a pipeline stage may lack some of these
    parallelize_module(
        model, tp_mesh, {k: v for k, v in outer.items() if getattr(model, k) is not None}
    )
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(  # (x, rotary table, document mask or None)
                input_layouts=(Shard(1), Replicate(), None),
                desired_input_layouts=(Replicate(), Replicate(), None),
            ),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **_attention_projections(block.attention),
        }
        if isinstance(block.feed_forward, MoE):
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Shard(1),),
                use_local_input=True,
                output_layouts=(Shard(1),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            )
        else:
            plan.update(
                {
                    "feed_forward": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                }
            )
        parallelize_module(block, tp_mesh, plan)
        # the kernel is a method, wrapped on the instance (activation checkpointing, applied
        # later, checkpoints this wrapper, to_local included)
        attention = block.attention
        attention.core_attention = functools.partial(_on_local_heads, attention.core_attention)
