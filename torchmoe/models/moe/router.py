"""Top-k token-choice router.

Legend (torchmoe/__init__.py): T tokens, D model dim, E experts, K experts per token, G expert
groups.

The router math (gate matmul, scores, selection, weights) runs in ``router_dtype`` with autocast
off, so bf16 training does not perturb which experts are chosen. Selection and weighting are
separate on purpose:

- *selection* ranks ``choice`` scores: the scores plus the expert bias (aux-loss-free
  balancing, DeepSeek-V3), masked to the best groups (group-limited routing); or the
  Sinkhorn-balanced assignment (S-BASE, in training); or round-robin (``force_load_balance``).
- *weights* that scale expert outputs always come from the unbiased scores of the chosen
  experts: softmax over all experts (``pre_softmax``) or over the k chosen logits, or sigmoid;
  optionally renormalised, then times the routed scaling factor.
"""

from dataclasses import dataclass

import torch
from torch import nn

from torchmoe.models.common.init import trunc_normal_

SINKHORN_ITERS = 16  # fixed, so selection needs no host sync; enough to balance to ~1e-3


@dataclass
class RouterArgs:
    dim: int
    num_experts: int
    topk: int
    score_function: str = "softmax"  # "softmax" | "sigmoid"
    pre_softmax: bool = True  # softmax: over all experts before top-k, or over the k chosen
    norm_topk_prob: bool = False
    scaling_factor: float = 1.0
    num_groups: int = 0  # group-limited routing off when 0
    group_topk: int = 0
    enable_expert_bias: bool = False
    sinkhorn: bool = False  # S-BASE: select by the Sinkhorn-balanced assignment
    force_load_balance: bool = False  # benchmark mode: round-robin selection
    input_jitter_eps: float = 0.0
    dtype: torch.dtype = torch.float32


@dataclass
class Routing:
    topk_idx_TK: torch.Tensor  # int64 expert ids
    topk_weight_TK: torch.Tensor  # router dtype, differentiable
    probs_TE: torch.Tensor  # per-token distribution over experts (sums to 1), for balance losses
    logits_TE: torch.Tensor  # gate outputs, for the z-loss


def sinkhorn_log(logits_TE: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Log of the doubly-normalised assignment exp(logits): alternately every expert column
    and every token row rescaled to equal mass, so a row's top-k favours under-used experts."""
    log_p = logits_TE
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
    return log_p


def round_robin(num_tokens: int, topk: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Expert (t * K + k) mod E for copy (t, k): every expert gets the same share."""
    copies = torch.arange(num_tokens * topk, device=device).view(num_tokens, topk)
    return copies % num_experts


class TopKRouter(nn.Module):
    """Scores every expert for every token and picks each token's top-k (see module docstring)."""

    # Computes with autocast off, in router_dtype: bfloat16 copies of weights made for autocast
    # compute (train/cached_weights.py) leave this module's parameters alone.
    autocast_exempt = True

    def __init__(self, args: RouterArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        if args.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        a = self.args
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.to(a.dtype)
            if self.training and a.input_jitter_eps > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(
                    1 - a.input_jitter_eps, 1 + a.input_jitter_eps
                )
            logits_TE = nn.functional.linear(x_TD, self.gate.weight.to(a.dtype))
            if a.score_function == "softmax":
                scores_TE = probs_TE = logits_TE.softmax(dim=-1)
            else:
                scores_TE = logits_TE.sigmoid()
                probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            topk_idx_TK = self._select(scores_TE, logits_TE)
            if a.score_function == "softmax" and not a.pre_softmax:
                weight_TK = logits_TE.gather(1, topk_idx_TK).softmax(dim=-1)
            else:
                weight_TK = scores_TE.gather(1, topk_idx_TK)
            if a.norm_topk_prob:
                weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
            weight_TK = weight_TK * a.scaling_factor
        return Routing(topk_idx_TK, weight_TK, probs_TE, logits_TE)

    def _select(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """The K experts of every token [T, K] (no gradient; see the module docstring)."""
        a = self.args
        T = scores_TE.shape[0]
        if a.force_load_balance:
            return round_robin(T, a.topk, a.num_experts, scores_TE.device)
        if a.sinkhorn and self.training:
            return sinkhorn_log(logits_TE.detach()).topk(a.topk, dim=-1).indices
        choice_TE = scores_TE.detach()
        if self.expert_bias is not None:
            choice_TE = choice_TE + self.expert_bias.to(choice_TE.dtype)
        if a.num_groups > 0:
            choice_TE = self._mask_to_top_groups(choice_TE)
        return choice_TE.topk(a.topk, dim=-1).indices

    def _mask_to_top_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Keep only experts of the ``group_topk`` best groups; the rest get -inf.

        A group's score is its best expert's score, or - with an expert bias, as DeepSeek-V3
        does - the sum of its two best, so a group with one lucky expert does not win.
        """
        a = self.args
        T, E = choice_TE.shape
        grouped_TGe = choice_TE.view(T, a.num_groups, E // a.num_groups)
        if self.expert_bias is not None:
            group_score_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_score_TG = grouped_TGe.amax(dim=-1)
        top_groups = group_score_TG.topk(a.group_topk, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)

    def init_weights(self, std: float) -> None:
        trunc_normal_(self.gate.weight, std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
