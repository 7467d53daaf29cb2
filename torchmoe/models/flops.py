"""Model FLOPs per token, following the convention of torchtitan's MoE models so numbers compare
across trainers: 6 x (active non-embedding parameters) per token for the matmuls (forward +
backward), plus 6 x layers x heads x seq_len x (qk_head_dim + v_head_dim) for attention scores
and values (no causal discount). Only the routed experts a token actually uses count as active.
"""

from torch import nn

from torchmoe.models.common.transformer import TransformerBlock
from torchmoe.models.moe.moe import moe_layers


def flops_per_token(module: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a model as built, before any parallel plan shards it, or of
    a part of one (a block, a pipeline stage), at sequence length ``seq_len``."""
    active = 0.0
    for name, p in module.named_parameters():
        if "tok_embeddings" in name:  # a lookup, no matmul
            continue
        active += p.numel()
    for _, moe in moe_layers(module):
        routed = sum(p.numel() for p in moe.experts.parameters())
        active -= routed * (1 - moe.args.router.topk / moe.args.router.num_experts)
    attention = sum(
        6 * a.n_heads * seq_len * (a.qk_head_dim + a.v_head_dim)
        for a in (
            block.attention for block in module.modules() if isinstance(block, TransformerBlock)
        )
    )
    return 6 * active + attention
