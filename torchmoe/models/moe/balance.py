"""Load balancing: auxiliary losses and the aux-loss-free expert-bias update.

Legend (torchmoe/__init__.py): B sequences, S tokens per sequence, T = B * S, E experts, K experts
per token.

Balance losses reach the optimizer without being returned through the model: each MoE layer
hooks its loss onto its output with ``attach_aux_loss``, whose backward feeds the loss's gradient
(times the current scale) straight in. This works unchanged under activation checkpointing and
compile, and wherever a layer's output is far from the final loss.
"""

import torch


def expert_counts(topk_idx_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Routed copies per expert [E] (dropped ones, id -1, included: they were routed)."""
    flat = topk_idx_TK.flatten()
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=dtype)
    )


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch / GShard): f_i the fraction of the routed copies counted in
    ``counts_E`` that went to expert i (no gradient), P_i the mean router probability of
    expert i over these T tokens. Equals 1 for perfectly uniform routing. With counts summed
    over every data-parallel rank this is the global variant (Megatron's global_aux_loss):
    averaged over ranks it equals the loss of all ranks' micro-batches on one process."""
    E = probs_TE.shape[1]
    f_E = counts_E / counts_E.sum()
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def sequence_counts(
    topk_idx_TK: torch.Tensor, batch: int, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """Routed copies per sequence and expert [B, E] (tokens are sequence-major)."""
    idx_BN = topk_idx_TK.reshape(batch, -1)
    return torch.zeros(batch, num_experts, dtype=dtype, device=idx_BN.device).scatter_add_(
        1, idx_BN, torch.ones_like(idx_BN, dtype=dtype)
    )


def sequence_aux_loss(probs_TE: torch.Tensor, counts_BE: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2/V3's sequence-wise balance loss: the Switch loss of each sequence, averaged,
    so no single sequence may pile onto a few experts. ``counts_BE`` may cover more of each
    sequence than ``probs_TE`` does (summed over sequence shards): averaged over the shards,
    the loss is then that of the whole sequences."""
    B, E = counts_BE.shape
    f_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True)
    return E * (f_BE * probs_TE.view(B, -1, E).mean(dim=1)).sum(dim=1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the gate logits, keeping them
    small so the softmax stays well-conditioned in low precision."""
    return logits_TE.logsumexp(dim=-1).square().mean()


def entropy_sum(probs_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the entropy of each token's distribution over experts (nats)."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum()


_aux_loss_scale = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """The factor the training loop applies to its LM loss (e.g. 1 / gradient-accumulation
    steps); balance losses get the same factor in backward."""
    global _aux_loss_scale
    _aux_loss_scale = scale


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, out: torch.Tensor, aux: torch.Tensor
    ) -> torch.Tensor:
        ctx.aux_dtype = aux.dtype
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_out, torch.ones((), dtype=ctx.aux_dtype, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Return ``out`` unchanged, such that backward through it also backpropagates ``aux``
    times the current scale. The scale is applied here, in forward, so a compiled graph
    guards on it instead of baking a stale value into its backward."""
    return _AttachAuxLoss.apply(out, aux * _aux_loss_scale)


@torch.no_grad()
def update_expert_bias(
    expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float
) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower
    it for over-loaded ones by ``rate``, from the token counts of the last optimizer step."""
    counts = tokens_per_expert_E.to(expert_bias_E.dtype)
    expert_bias_E.add_(rate * torch.sign(counts.mean() - counts))
