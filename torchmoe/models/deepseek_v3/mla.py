"""Multi-head latent attention (MLA), DeepSeek-V2/V3's attention.

Legend (torchmoe/__init__.py): B batch, S sequence, A key/value positions, D model dim, H heads,
Q query/key channels per head (qk_nope_head_dim + qk_rope_head_dim), U value channels per head,
R rotary channels per head (qk_rope_head_dim).

MLA rebuilds keys and values from a kv_lora_rank-dim latent; one R-dim rotary key is shared by
all heads.
Training runs the "naive" form (materialised per-head keys) through the shared attention kernel
(``Attention.core_attention``, models/common/attention.py).
"""

from dataclasses import dataclass

import torch
from torch import nn

from torchmoe.models.common.attention import Attention
from torchmoe.models.common.document_mask import AttentionMask
from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.kv_cache import LayerCache
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import apply_rope


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


class MLA(Attention):
    """Multi-head latent attention; see the module docstring."""

    def __init__(self, args: MLAArgs):
        super().__init__(args.softmax_scale)
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

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_sin: torch.Tensor,
        mask: AttentionMask | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        a = self.args
        q_in = x_BSD if a.q_lora_rank == 0 else self.wq_a(x_BSD)
        latent, k_pe = self.wkv_a(x_BSD).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        if cache is not None:
            return self.wo(self.cached_attention(q_in, latent, k_pe, cos_sin, cache).flatten(2))
        latent, k_pe, kv_cos_sin = self.key_value_inputs(latent, k_pe, cos_sin)
        q_BSHQ, k_BAHQ, v_BAHU = self.up_project(q_in, latent, k_pe, cos_sin, kv_cos_sin)
        return self.wo(self.core_attention(q_BSHQ, k_BAHQ, v_BAHU, mask).flatten(2))

    def key_value_inputs(
        self, kv_latent: torch.Tensor, k_pe: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents [B, A, C] and rotary keys [B, A, R] that keys and values are made from,
        and the rotary rows of their A positions: this sequence's own (A = S). A method of its
        own so context parallelism can gather the small latents of the whole sequence instead
        of the per-head keys and values (parallel/context_parallel.py)."""
        return kv_latent, k_pe, cos_sin

    def up_project(
        self,
        q_in: torch.Tensor,
        kv_latent: torch.Tensor,
        k_pe: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cos_sin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query input (x, or the Q-dim latent) and the C-dim key/value latent -> per-head
        q [B, S, H, Q], k [B, A, H, Q] and v [B, A, H, U]: ``q_norm`` / ``kv_norm``, the up
        projections and rotary (``kv_cos_sin``: the keys' rows when their A positions are not
        the queries' S). A method of its own so activation checkpointing can recompute it from
        the small latents (``recompute_modules = ["mla_up_proj"]``)."""
        a = self.args
        B, S, _ = q_in.shape
        kv_cos_sin = cos_sin if kv_cos_sin is None else kv_cos_sin
        q = self.wq(q_in) if a.q_lora_rank == 0 else self.wq_b(self.q_norm(q_in))
        q_BSHQ = q.view(B, S, -1, self.qk_head_dim)
        q_nope, q_pe = q_BSHQ.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_BSHQ = torch.cat([q_nope, apply_rope(q_pe, cos_sin)], dim=-1)

        A = kv_latent.shape[1]
        k_pe_BA1R = apply_rope(k_pe.unsqueeze(2), kv_cos_sin)
        kv = self.wkv_b(self.kv_norm(kv_latent)).view(B, A, -1, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v_BAHU = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k_BAHQ = torch.cat([k_nope, k_pe_BA1R.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return q_BSHQ, k_BAHQ, v_BAHU

    def cached_attention(
        self,
        q_in: torch.Tensor,
        kv_latent: torch.Tensor,
        k_pe: torch.Tensor,
        cos_sin: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Generation: attention on the cached latents [B, T, C] and rotary keys [B, T, R].
        The key half of ``wkv_b`` is folded into the queries and its value half applied after
        the weighted sum, so per-head keys and values are never built: the same function as
        ``up_project`` + the kernel, with the products in another order. -> [B, S, H, U]."""
        a = self.args
        B, S, _ = q_in.shape
        q = self.wq(q_in) if a.q_lora_rank == 0 else self.wq_b(self.q_norm(q_in))
        q_nope, q_pe = q.view(B, S, -1, self.qk_head_dim).split(
            [a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1
        )
        latent_BTC, k_pe_BTR = cache.update(
            self.kv_norm(kv_latent), apply_rope(k_pe.unsqueeze(2), cos_sin).squeeze(2)
        )
        w_HKC = self.wkv_b.weight.view(-1, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        w_key, w_value = w_HKC.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)
        q_latent = torch.einsum("bshk,hkc->bshc", q_nope, w_key)
        scores = torch.einsum("bshc,btc->bhst", q_latent, latent_BTC)
        scores = scores + torch.einsum("bshr,btr->bhst", apply_rope(q_pe, cos_sin), k_pe_BTR)
        scores = (scores.float() * self.softmax_scale).masked_fill(~cache.visible, -torch.inf)
        out_latent = torch.einsum("bhst,btc->bshc", scores.softmax(-1).to(q.dtype), latent_BTC)
        return torch.einsum("bshc,huc->bshu", out_latent, w_value)

    def init_weights(self, std: float, out_std: float) -> None:
        for name, module in self.named_children():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                trunc_normal_(module.weight, out_std if name == "wo" else std)
