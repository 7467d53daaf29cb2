"""Attention: multi-head latent attention (MLA, DeepSeek-V2/V3) and grouped-query attention
(GQA: Mixtral, Qwen3, Llama).

Shapes: B batch, S sequence, D model dim, H heads, G key/value heads, K/V per-head query-key /
value dims; for MLA N = qk_nope_head_dim, R = qk_rope_head_dim, C = kv_lora_rank,
Q = q_lora_rank.

MLA rebuilds keys and values from a C-dim latent; one R-dim rotary key is shared by all heads.
Training runs the "naive" form (materialised per-head keys) through scaled_dot_product_attention.
Both modules expose ``n_heads``, ``qk_head_dim`` and ``v_head_dim`` for FLOP and memory counts.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import apply_rope


class ScaledDotProductAttention(nn.Module):
    """Causal attention over per-head q, k [B, S, H, K] and v [B, S, H, V] -> [B, S, H, V].

    A module of its own so parallel plans can hand it local heads (tensor parallel) or swap the
    kernel; flash kernels want equal q/k/v head dims, so V is padded up to K and sliced back.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(
        self, q_BSHK: torch.Tensor, k_BSGK: torch.Tensor, v_BSGV: torch.Tensor
    ) -> torch.Tensor:
        groups = q_BSHK.shape[2] // k_BSGK.shape[2]  # GQA: each key/value head serves a group
        k_BSHK = k_BSGK.repeat_interleave(groups, dim=2) if groups > 1 else k_BSGK
        v_BSHV = v_BSGV.repeat_interleave(groups, dim=2) if groups > 1 else v_BSGV
        v_dim = v_BSHV.shape[-1]
        pad = q_BSHK.shape[-1] - v_dim
        v = F.pad(v_BSHV, (0, pad)) if pad > 0 else v_BSHV
        out = F.scaled_dot_product_attention(
            q_BSHK.transpose(1, 2),
            k_BSHK.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
        )
        return out.transpose(1, 2)[..., :v_dim]


@dataclass
class MLAArgs:
    dim: int
    n_heads: int
    q_lora_rank: int  # 0 = project queries directly from x
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm_eps: float
    softmax_scale: float


class MLAUpProjection(nn.Module):
    """MLA's up projection: the query input (x, or the Q-dim latent) and the C-dim key/value
    latent -> per-head q, k [B, S, H, K] and v [B, S, H, V] (norms, projections, rotary).

    Parameter-free: it runs the layers of the MLA passed in, so their parameter names stay
    ``attention.wq_b`` etc. A module of its own so activation checkpointing can recompute it
    from the small latents (``recompute_modules = ["mla_up_proj"]``).
    """

    def forward(
        self,
        mla: "MLA",
        q_in: torch.Tensor,
        kv_latent: torch.Tensor,
        k_pe: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = mla.args
        B, S, _ = q_in.shape
        q = mla.wq(q_in) if a.q_lora_rank == 0 else mla.wq_b(mla.q_norm(q_in))
        q_BSHK = q.view(B, S, -1, mla.qk_head_dim)
        q_nope, q_pe = q_BSHK.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_BSHK = torch.cat([q_nope, apply_rope(q_pe, cos_sin)], dim=-1)

        k_pe_BS1R = apply_rope(k_pe.unsqueeze(2), cos_sin)
        kv = mla.wkv_b(mla.kv_norm(kv_latent)).view(B, S, -1, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v_BSHV = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k_BSHK = torch.cat([k_nope, k_pe_BS1R.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return q_BSHK, k_BSHK, v_BSHV


class MLA(nn.Module):
    """Multi-head latent attention; see the module docstring."""

    def __init__(self, args: MLAArgs):
        super().__init__()
        self.args = args
        a = args
        self.n_heads = a.n_heads
        self.qk_head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        self.v_head_dim = a.v_head_dim
        if a.q_lora_rank == 0:
            self.wq = nn.Linear(a.dim, a.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(a.dim, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, eps=a.norm_eps)
            self.wq_b = nn.Linear(a.q_lora_rank, a.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(a.dim, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(a.kv_lora_rank, eps=a.norm_eps)
        self.wkv_b = nn.Linear(
            a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False
        )
        self.wo = nn.Linear(a.n_heads * a.v_head_dim, a.dim, bias=False)
        self.up_proj = MLAUpProjection()
        self.inner_attention = ScaledDotProductAttention(a.softmax_scale)

    def forward(self, x_BSD: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        a = self.args
        q_in = x_BSD if a.q_lora_rank == 0 else self.wq_a(x_BSD)
        latent, k_pe = self.wkv_a(x_BSD).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        q_BSHK, k_BSHK, v_BSHV = self.up_proj(self, q_in, latent, k_pe, cos_sin)
        return self.wo(self.inner_attention(q_BSHK, k_BSHK, v_BSHV).flatten(2))

    def init_weights(self, std: float, out_std: float) -> None:
        for name, module in self.named_children():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                trunc_normal_(module.weight, out_std if name == "wo" else std)


@dataclass
class GQAArgs:
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    softmax_scale: float
    qk_norm: bool = False  # RMSNorm over each query / key head before RoPE (Qwen3)
    norm_eps: float = 1e-6


class GQA(nn.Module):
    """Grouped-query attention with rotary embeddings over the whole head dim.

    With ``qk_norm`` every query and key head is RMS-normalised over its K channels (one
    weight of K shared by all heads, ``q_norm`` / ``k_norm``) before the rotation, as Qwen3
    does; it bounds the attention logits, which keeps large-learning-rate training stable.
    """

    def __init__(self, args: GQAArgs):
        super().__init__()
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
        self.inner_attention = ScaledDotProductAttention(a.softmax_scale)

    def forward(self, x_BSD: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        hd = self.args.head_dim
        q_BSHK = self.wq(x_BSD).view(B, S, -1, hd)
        k_BSGK = self.wk(x_BSD).view(B, S, -1, hd)
        if self.args.qk_norm:
            q_BSHK, k_BSGK = self.q_norm(q_BSHK), self.k_norm(k_BSGK)
        q_BSHK, k_BSGK = apply_rope(q_BSHK, cos_sin), apply_rope(k_BSGK, cos_sin)
        v_BSGV = self.wv(x_BSD).view(B, S, -1, hd)
        return self.wo(self.inner_attention(q_BSHK, k_BSGK, v_BSGV).flatten(2))

    def init_weights(self, std: float, out_std: float) -> None:
        for name in ("wq", "wk", "wv"):
            trunc_normal_(getattr(self, name).weight, std)
        trunc_normal_(self.wo.weight, out_std)
        if self.args.qk_norm:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()
