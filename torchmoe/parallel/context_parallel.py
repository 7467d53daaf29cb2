"""Context parallelism: every sequence split over ``cp`` ranks, attention over all of it.

Legend (torchmoe/__init__.py): B batch, S sequence, H query heads, J key/value heads, Q
query/key channels per head, U value channels per head.

The sequence is cut into 2 x cp chunks of L = S / (2 cp) tokens; rank r holds chunks r and
2 cp - 1 - r (a head and a tail chunk). Under causal attention a late chunk attends to more
keys than an early one, so pairing them gives every rank the same attention work.

The model takes whole sequences and the positions of the rank's chunks (``local_positions``;
``Decoder.forward``): it embeds only those tokens, rotates them by their positions, masks their
queries over every key (packed documents: from the whole sequences' document ids) and reads
multi-token prediction's inputs and targets past a chunk's end. The training loop compares the
logits with the chunks' labels (``shard_sequence``). Everything but attention is per-token and
runs on the local chunks unchanged. ``apply_cp`` wraps every attention module's kernel
(``core_attention``): keys and values are all-gathered over the cp ranks (autograd-aware: their
gradients reduce-scatter back), put in sequence order, and each local query attends to the keys
at or before its own position: a flex-attention BlockMask on CUDA (built once, at plan time;
the kernel skips the blocks above the diagonal), dense [2L, S] booleans elsewhere.

Reductions that must see whole sequences (the balance losses' expert counts, the step's loss,
multi-token prediction's target counts) run over the cp ranks too: ``Meshes.sequence`` and
``Meshes.loss`` (dims.py), ``MultiTokenPrediction.target_counts``. Dense
parameters are sharded by FSDP over dp_shard x cp, so cp ranks sum their gradients.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.flex_attention import create_block_mask

from torchmoe.models.common.attention import Attention
from torchmoe.models.common.document_mask import AttentionMask


def local_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two of the 2 x cp sequence chunks that ``rank`` holds, in its local order."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions [2L] in the sequence of the tokens ``rank`` holds, in local order."""
    L = seq_len // (2 * cp)
    return torch.cat(
        [torch.arange(c * L, (c + 1) * L, device=device) for c in local_chunks(cp, rank)]
    )


def shard_sequence(t_BS: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rank's chunks of a [B, S, ...] batch tensor (tokens, labels)."""
    return t_BS.index_select(1, positions)


# torch 2.13 renamed the autograd all-gather (the old name warns there); 2.11 has the old one
_all_gather = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


def gather_sequence(t_local: torch.Tensor, cp: int, group) -> torch.Tensor:
    """[B, 2L, ...] chunks of every cp rank -> [B, S, ...] in sequence order (autograd: the
    gradient of the whole reduce-scatters back to each rank's chunks)."""
    gathered = _all_gather(t_local.contiguous(), gather_dim=1, group=group)
    pieces = gathered.chunk(2 * cp, dim=1)  # rank r's chunks at 2r (head) and 2r + 1 (tail)
    order = [2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)]
    return torch.cat([pieces[i] for i in order], dim=1)


def causal_mask(q_pos: torch.Tensor, seq_len: int) -> AttentionMask:
    """Queries at ``q_pos`` [Q] x all keys [S]: a query sees the keys at or before its
    position. A flex-attention BlockMask on CUDA, dense [Q, S] booleans elsewhere."""
    if q_pos.device.type != "cuda":
        return q_pos[:, None] >= torch.arange(seq_len, device=q_pos.device)[None, :]
    last = q_pos.numel() - 1

    def visible(b, h, q_idx, kv_idx):  # a partial last block asks for q_idx past the end
        return q_pos[q_idx.clamp(max=last)] >= kv_idx

    return create_block_mask(
        visible, None, None, q_pos.numel(), seq_len, device=q_pos.device, _compile=True
    )


def _context_parallel_kernel(
    kernel: Callable[..., torch.Tensor],
    cp: int,
    group,
    q_pos: torch.Tensor,
    block_mask: AttentionMask | None,
    q_BSHQ: torch.Tensor,
    k_BSJQ: torch.Tensor,
    v_BSJU: torch.Tensor,
    document_mask: AttentionMask | None = None,
) -> torch.Tensor:
    """``kernel`` (the module's own core_attention) of the local queries over the gathered
    keys and values, with the model's document mask (made for the local queries over every
    key: ``document_mask``'s ``q_positions``) or else the causal one: the plan-time
    ``block_mask`` on CUDA, elsewhere made per call from ``q_pos`` (held only while one
    attention runs; the CPU dry run would otherwise hold it for 128K-token sequences)."""
    k_full, v_full = gather_sequence(k_BSJQ, cp, group), gather_sequence(v_BSJU, cp, group)
    mask = document_mask
    if mask is None:
        mask = block_mask if block_mask is not None else causal_mask(q_pos, k_full.shape[1])
    return kernel(q_BSHQ, k_full, v_full, mask)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> None:
    """Wrap every attention module's kernel (module docstring) for sequences of ``seq_len``
    tokens split over ``cp_mesh``, and mark the module ``context_parallel`` (the training
    loop refuses a plan that leaves one out). Apply before tensor parallelism, which then
    hands this wrapper local heads."""
    cp, rank, group = cp_mesh.size(), cp_mesh.get_local_rank(), cp_mesh.get_group()
    device = torch.device(cp_mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    q_pos = local_positions(seq_len, cp, rank, device)
    block_mask = causal_mask(q_pos, seq_len) if device.type == "cuda" else None
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        attention.core_attention = functools.partial(
            _context_parallel_kernel, attention.core_attention, cp, group, q_pos, block_mask
        )
        attention.context_parallel = True
    mtp = getattr(model, "mtp", None)
    if mtp is not None:  # each depth's mean divides by the targets of the whole sequences
        mtp.target_counts = functools.partial(all_reduce, reduceOp="sum", group=group)
        mtp.sequence_shards = cp


def missing_context_parallel(model: nn.Module) -> list[str]:
    """Names of the attention modules a plan left without ``apply_cp``."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, Attention) and not getattr(m, "context_parallel", False)
    ]
