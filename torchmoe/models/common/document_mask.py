"""Masks that keep packed documents apart (``model.attn_mask = "block_causal"``).

The loader packs several documents into one row; with plain causal attention a token sees the
documents before it in the row. Given each position's document index ([B, S], the loader's
``document_ids``), a token attends only to earlier tokens of its own document.

On CUDA the mask is a flex-attention ``BlockMask``: the kernel skips the blocks between
documents, so many short documents cost less than causal attention. Elsewhere (CPU, where flex
attention has no backward) it is a dense boolean [B, 1, S, S] mask for SDPA, exact but O(S^2)
memory: the CPU path is for tests and small runs.

Positions do not restart per document: neither DeepSeek-V3's nor Qwen3's reference does, and
rotary embeddings depend only on the distance between query and key, so a document's own
attention scores are the same at any offset in the row (up to rounding).
"""

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

AttentionMask = BlockMask | torch.Tensor  # None, where a mask is optional, means plain causal


def document_mask(
    document_ids_BS: torch.Tensor | None, q_positions: torch.Tensor | None = None
) -> AttentionMask | None:
    """The block-causal mask of a batch whose position (b, s) belongs to document
    ``document_ids_BS[b, s]`` (documents are contiguous runs of equal ids); None (plain causal
    attention) without document ids. Queries are all S positions, or only those at
    ``q_positions`` [Q] (a context-parallel rank's chunks) over keys at all S positions."""
    if document_ids_BS is None:
        return None
    doc = document_ids_BS
    B, S = doc.shape
    q_pos = torch.arange(S, device=doc.device) if q_positions is None else q_positions
    if doc.device.type != "cuda":
        causal = q_pos[:, None] >= torch.arange(S, device=doc.device)[None, :]
        same_document = doc[:, q_pos, None] == doc[:, None, :]
        return (same_document & causal)[:, None]

    last_q = q_pos.numel() - 1

    def same_document_causal(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        # a partial last block asks for indices past the ends: read in range (kv past S is
        # after every query, so the causal term masks it anyway)
        q = q_pos[q_idx.clamp(max=last_q)]
        return (q >= kv_idx) & (doc[b, q] == doc[b, kv_idx.clamp(max=S - 1)])

    # compiled: eager mask building materialises every (query, key) pair first, O(B S^2)
    return create_block_mask(
        same_document_causal, B, None, q_pos.numel(), S, device=doc.device, _compile=True
    )
