"""Load balancing: auxiliary losses and the aux-loss-free expert-bias update.

Legend: B sequences, S tokens per sequence, T = B * S, E experts, K experts per token.

Balance losses reach the optimizer without being returned through the model: each MoE layer
hooks its loss onto its output with ``attach_aux_loss``, whose backward feeds the loss's gradient
(times the current scale) straight in. This works unchanged under activation checkpointing and
pipeline stages, where a layer's output is far from the final loss.
"""

import torch


def switch_aux_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch / GShard), f_i the fraction of the T*K assignments that went
    to expert i (no gradient), P_i the mean router probability of expert i.
    Equals 1 for perfectly uniform routing."""
    T, E = probs_TE.shape
    counts_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_E.scatter_add_(0, topk_idx_TK.flatten(), torch.ones_like(topk_idx_TK.flatten(),
                                                                    dtype=probs_TE.dtype))
    f_E = counts_E / topk_idx_TK.numel()
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def sequence_aux_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, batch: int
                      ) -> torch.Tensor:
    """DeepSeek-V2/V3's sequence-wise balance loss: the Switch loss of each sequence, averaged,
    so no single sequence may pile onto a few experts."""
    T, E = probs_TE.shape
    probs_BSE = probs_TE.view(batch, -1, E)
    idx_BSK = topk_idx_TK.view(batch, probs_BSE.shape[1], -1)
    one_hot_BSE = torch.zeros_like(probs_BSE).scatter_add_(
        2, idx_BSK, torch.ones_like(idx_BSK, dtype=probs_BSE.dtype))
    f_BE = one_hot_BSE.sum(dim=1) / (idx_BSK.shape[1] * idx_BSK.shape[2])
    return E * (f_BE * probs_BSE.mean(dim=1)).sum(dim=1).mean()


_aux_loss_scale = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """The factor the training loop applies to its LM loss (e.g. 1 / gradient-accumulation
    steps); balance losses get the same factor in backward."""
    global _aux_loss_scale
    _aux_loss_scale = scale


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: torch.Tensor, aux: torch.Tensor
                ) -> torch.Tensor:
        ctx.aux_dtype = aux.dtype
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_out, torch.ones((), dtype=ctx.aux_dtype, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Return ``out`` unchanged, such that backward through it also backpropagates ``aux``
    times the current scale. The scale is applied here, in forward, so a compiled graph
    guards on it instead of baking a stale value into its backward."""
    return _AttachAuxLoss.apply(out, aux * _aux_loss_scale)


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                       rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower
    it for over-loaded ones by ``rate``, from the token counts of the last optimizer step."""
    counts = tokens_per_expert_E.to(expert_bias_E.dtype)
    expert_bias_E.add_(rate * torch.sign(counts.mean() - counts))
