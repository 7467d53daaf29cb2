"""Attention shared by the families: the causal attention kernel and grouped-query attention
(GQA: Mixtral, Qwen3, Llama). MLA (DeepSeek-V2/V3) lives with its family, in
``models/deepseek_v3/mla.py``, and shares the kernel through ``Attention``.

Legend (torchmoe/__init__.py): B batch, S sequence, D model dim, H query heads, J key/value
heads, Q query/key channels per head, U value channels per head.

Attention modules expose ``n_heads``, ``qk_head_dim`` and ``v_head_dim`` for FLOP and memory
counts.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from torchmoe.models.common.document_mask import AttentionMask
from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.kv_cache import LayerCache
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import apply_rope


def causal_attention(
    q_BSHQ: torch.Tensor,
    k_BSJQ: torch.Tensor,
    v_BSJU: torch.Tensor,
    scale: float,
    mask: AttentionMask | None = None,
) -> torch.Tensor:
    """Causal attention over per-head q [B, S, H, Q], k [B, S, J, Q] and v [B, S, J, U] ->
    [B, S, H, U]; each key/value head serves H / J query heads. ``mask`` (document_mask.py)
    also keeps packed documents apart: a flex-attention BlockMask on CUDA, a dense boolean
    mask elsewhere."""
    q, k, v = (t.transpose(1, 2) for t in (q_BSHQ, k_BSJQ, v_BSJU))
    if isinstance(mask, BlockMask):  # flex takes GQA and a value dim of its own
        return _flex_attention(q, k, v, mask, scale).transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    v_dim = v.shape[-1]
    pad = q.shape[-1] - v_dim  # flash kernels want equal q/k/v head dims: pad U up to Q
    v = F.pad(v, (0, pad)) if pad > 0 else v
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return out.transpose(1, 2)[..., :v_dim]


_compiled_flex: Callable | None = None


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
) -> torch.Tensor:
    """Flex attention, compiled: eager flex materialises the full score matrix. Inside a
    compiled block it is traced with the block; outside, a compiled copy (made once) runs."""
    global _compiled_flex
    if torch.is_autocast_enabled(q.device.type):  # flex is no autocast op: SDPA's precision
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = flex_attention
    if not torch.compiler.is_compiling():
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        kernel = _compiled_flex
    # float32 tiles of wide heads (MLA's 192) overflow shared memory at flex's default sizes
    options = _FLOAT32_FLEX_TILES if q.dtype == torch.float32 else None
    return kernel(
        q,
        k,
        v,
        block_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=options,
    )


_FLOAT32_FLEX_TILES = {
    "BLOCK_M": 32,
    "BLOCK_N": 32,
    "BLOCK_M1": 16,
    "BLOCK_N1": 32,
    "BLOCK_M2": 32,
    "BLOCK_N2": 16,
    "num_stages": 1,
}


class Attention(nn.Module):
    """Base of the attention modules (GQA, MLA): the kernel call is the method
    ``core_attention``, which parallel plans wrap on an instance (tensor parallelism hands it
    local heads; activation checkpointing recomputes it, ``recompute_modules = ["core_attn"]``)
    or replace to swap the kernel."""

    def __init__(self, softmax_scale: float):
        super().__init__()
        self.softmax_scale = softmax_scale

    def core_attention(
        self,
        q_BSHQ: torch.Tensor,
        k_BSJQ: torch.Tensor,
        v_BSJU: torch.Tensor,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        return causal_attention(q_BSHQ, k_BSJQ, v_BSJU, self.softmax_scale, mask)


@dataclass
class GQAArgs:
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    softmax_scale: float
    qk_norm: bool = False  # RMSNorm over each query / key head before RoPE (Qwen3)
    norm_eps: float = 1e-6


class GQA(Attention):
    """Grouped-query attention with rotary embeddings over the whole head dim.

    With ``qk_norm`` every query and key head is RMS-normalised over its Q channels (one
    weight of Q shared by all heads, ``q_norm`` / ``k_norm``) before the rotation, as Qwen3
    does; it bounds the attention logits, which keeps large-learning-rate training stable.
    """

    def __init__(self, args: GQAArgs):
        super().__init__(args.softmax_scale)
        self.args = args
        a = args
        self.n_heads = a.n_heads
        self.qk_head_dim = self.v_head_dim = a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, eps=a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, eps=a.norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_sin: torch.Tensor,
        mask: AttentionMask | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        hd = self.args.head_dim
        q_BSHQ = self.wq(x_BSD).view(B, S, -1, hd)
        k_BSJQ = self.wk(x_BSD).view(B, S, -1, hd)
        if self.args.qk_norm:
            q_BSHQ, k_BSJQ = self.q_norm(q_BSHQ), self.k_norm(k_BSJQ)
        q_BSHQ, k_BSJQ = apply_rope(q_BSHQ, cos_sin), apply_rope(k_BSJQ, cos_sin)
        v_BSJU = self.wv(x_BSD).view(B, S, -1, hd)
        if cache is not None:  # attend over every cached position up to each query's own
            (k_BSJQ, v_BSJU), mask = cache.update(k_BSJQ, v_BSJU), cache.visible
        return self.wo(self.core_attention(q_BSHQ, k_BSJQ, v_BSJU, mask).flatten(2))

    def init_weights(self, std: float, out_std: float) -> None:
        for name in ("wq", "wk", "wv"):
            trunc_normal_(getattr(self, name).weight, std)
        trunc_normal_(self.wo.weight, out_std)
        if self.args.qk_norm:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()
