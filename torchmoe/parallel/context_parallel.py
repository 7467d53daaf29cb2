"""Context parallelism: every sequence split over ``cp`` ranks, attention over all of it.

Legend (torchmoe/__init__.py): B batch, S sequence (a rank's chunks where local), A key/value
positions (the whole sequence), H query heads, J key/value heads, Q query/key channels per
head, U value channels per head.

The sequence is cut into 2 x cp chunks of S / (2 cp) tokens; rank r holds chunks r and
2 cp - 1 - r (a head and a tail chunk). Under causal attention a late chunk attends to more
keys than an early one, so pairing them gives every rank the same attention work.

The model takes whole sequences and the positions of the rank's chunks (``local_positions``;
``Decoder.forward``): it embeds only those tokens, rotates them by their positions, masks their
queries over every key (packed documents: from the whole sequences' document ids) and reads
multi-token prediction's inputs and targets past a chunk's end. The training loop compares the
logits with the chunks' labels (``shard_sequence``). Everything but attention is per-token and
runs on the local chunks unchanged. ``apply_cp`` wraps every attention module's kernel
(``core_attention``): it sees the keys and values of the whole sequence, all-gathered over the
cp ranks in sequence order (autograd-aware: their gradients reduce-scatter back); MLA gathers
its small latents and rotary keys instead and makes the keys and values from them
(``MLA.key_value_inputs``). Each local query attends to the keys at or before its own position:
a flex-attention BlockMask on CUDA (built once, at plan time; the kernel skips the blocks above
the diagonal), dense [S / cp, S] booleans elsewhere.

Reductions that must see whole sequences (the balance losses' expert counts, the step's loss,
multi-token prediction's target counts) run over the cp ranks too: ``Meshes.sequence`` and
``Meshes.loss`` (dims.py), ``MultiTokenPrediction.target_counts``. Dense parameters are sharded
by FSDP over dp_shard x cp, so cp ranks sum their gradients.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.attention.flex_attention import create_block_mask

from torchmoe.models.common.attention import Attention
from torchmoe.models.common.document_mask import AttentionMask
from torchmoe.parallel.collectives import all_gather_autograd


def local_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two of the 2 x cp sequence chunks that ``rank`` holds, in its local order."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions [S / cp] in the sequence of the tokens ``rank`` holds, in local order."""
    chunk = seq_len // (2 * cp)
    return torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in local_chunks(cp, rank)]
    )


def shard_sequence(t_BS: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rank's chunks of a [B, S, ...] batch tensor (tokens, labels)."""
    return t_BS.index_select(1, positions)


def gather_sequence(t_local: torch.Tensor, *, cp: int, group) -> torch.Tensor:
    """[B, S / cp, ...] chunks of every cp rank -> [B, S, ...] in sequence order (autograd: the
    gradient of the whole reduce-scatters back to each rank's chunks)."""
    gathered = all_gather_autograd(t_local.contiguous(), gather_dim=1, group=group)
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
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    q_pos: torch.Tensor,
    block_mask: AttentionMask | None,
    q_BSHQ: torch.Tensor,
    k_BAJQ: torch.Tensor,
    v_BAJU: torch.Tensor,
    document_mask: AttentionMask | None = None,
) -> torch.Tensor:
    """``kernel`` (the module's own core_attention) of the local queries over the keys and
    values of the whole sequence (``gather``-ed here, or made whole from gathered latents:
    MLA), with the model's document mask (made for the local queries over every key:
    ``document_mask``'s ``q_positions``) or else the causal one: the plan-time ``block_mask``
    on CUDA, elsewhere made per call from ``q_pos`` (held only while one attention runs; the
    CPU dry run would otherwise hold it for 128K-token sequences)."""
    if gather is not None:
        k_BAJQ, v_BAJU = gather(k_BAJQ), gather(v_BAJU)
    mask = document_mask
    if mask is None:
        mask = block_mask if block_mask is not None else causal_mask(q_pos, k_BAJQ.shape[1])
    return kernel(q_BSHQ, k_BAJQ, v_BAJU, mask)


def _whole_sequence_latents(
    gather: Callable[[torch.Tensor], torch.Tensor],
    decoder: nn.Module,
    kv_latent: torch.Tensor,
    k_pe: torch.Tensor,
    cos_sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's ``key_value_inputs`` under context parallelism: the latents and rotary keys of
    every cp rank, in sequence order, with the rotary rows of every position (the decoder's
    table; its first S rows are used). Tensor parallelism hands them over as replicated
    DTensors: gathered locally and handed back alike, the table too."""

    def like(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return local
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False)

    def whole(t: torch.Tensor) -> torch.Tensor:
        return like(t, gather(t.to_local() if isinstance(t, DTensor) else t))

    return whole(kv_latent), whole(k_pe), like(cos_sin, decoder.rope_cos_sin)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> None:
    """Wrap every attention module's kernel (module docstring) for sequences of ``seq_len``
    tokens split over ``cp_mesh``, and mark the module ``context_parallel`` (the training
    loop refuses a plan that leaves one out). MLA gathers its latents and rotary keys, 9x
    (16B) to 70x (671B) less to send than the per-head keys and values it makes from them
    (every rank still makes, and keeps for backward, those of the whole sequence: its
    ``kv_norm`` and ``wkv_b`` run over all S tokens, not S / cp); other attention gathers its
    keys and values. Apply before tensor parallelism, which then hands
    these wrappers local heads."""
    cp, rank, group = cp_mesh.size(), cp_mesh.get_local_rank(), cp_mesh.get_group()
    device = torch.device(cp_mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    q_pos = local_positions(seq_len, cp, rank, device)
    block_mask = causal_mask(q_pos, seq_len) if device.type == "cuda" else None
    gather = functools.partial(gather_sequence, cp=cp, group=group)
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        makes_whole = hasattr(attention, "key_value_inputs")  # MLA
        if makes_whole:
            attention.key_value_inputs = functools.partial(_whole_sequence_latents, gather, model)
        attention.core_attention = functools.partial(
            _context_parallel_kernel,
            attention.core_attention,
            None if makes_whole else gather,
            q_pos,
            block_mask,
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
