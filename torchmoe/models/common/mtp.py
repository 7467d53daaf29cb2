"""DeepSeek-V3's multi-token prediction (MTP): D extra depths after the main model, depth k
predicting the token k + 1 places ahead of the main model's target.

Legend (torchmoe/__init__.py): B batch, S sequence, D model dim, V vocabulary.

Any family may use it: the decoder builds it from ``mtp_num_layers`` blocks shaped like its last
block. The depths share the decoder's embedding (their inputs) and output head (their logits),
which the decoder passes in, so MTP holds no copy of either.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchmoe.models.common.document_mask import AttentionMask
from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.moe.moe import is_recomputing

_IGNORE = -100  # cross-entropy target of positions whose token lies past the sequence


def _shift_left(tokens_BS: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """tokens[:, t + n] at position t; the last n positions get ``fill``."""
    return F.pad(tokens_BS[:, n:], (0, n), value=fill) if n else tokens_BS


def mtp_inputs(
    embed: nn.Module,
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    depth: int,
    positions: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What depth k (1-based) reads at position t: the embedding of token t + k
    (labels[t + k - 1]; where that label is masked, as prompts are, the input token it
    stands for); past the end, of token 0. Only at ``positions`` if given (whole sequences
    in, a context-parallel rank's chunks out). A pipeline's first stage makes them (it holds
    the embedding) for the last stage, which holds the depths."""
    following = torch.where(labels_BS == _IGNORE, _shift_left(tokens_BS, 1, 0), labels_BS)
    return [embed(_at(_shift_left(following, k - 1, 0), positions)) for k in range(1, depth + 1)]


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def _at(t_BS: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    return t_BS if positions is None else t_BS[:, positions]


class MTPModule(nn.Module):
    """One depth: h' = block(eh_proj([enorm(e); hnorm(h)])), where h is the previous depth's
    hidden state [B, S, D] and e the embedding of the token this depth adds. Its logits are
    output(norm(h')), with the decoder's output head.

    The embedding half comes first in the concatenation, as in DeepSeek-V3's released
    weights (``eh_proj`` is [D, 2D]), so they load without reordering columns.
    """

    def __init__(self, block: nn.Module, dim: int, norm_eps: float):
        super().__init__()
        self.enorm = RMSNorm(dim, eps=norm_eps)
        self.hnorm = RMSNorm(dim, eps=norm_eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.norm = RMSNorm(dim, eps=norm_eps)

    def forward(
        self,
        h_BSD: torch.Tensor,
        emb_BSD: torch.Tensor,
        cos_sin: torch.Tensor,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """The next depth's hidden state (before ``norm``)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x, cos_sin, mask)

    def init_weights(self, std: float, out_std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        trunc_normal_(self.eh_proj.weight, std)
        self.block.init_weights(std, out_std)


class MultiTokenPrediction(nn.ModuleList):
    """The depths, in order (a ModuleList, so parameters are named ``mtp.<k>.*`` as in the
    released checkpoints' layout). ``loss`` gives L = loss_scale / D * sum_k mean CE_k, and
    ``loss_sum`` adds L up over real forwards (not activation-checkpoint recomputation) for
    the training loop to log and reset.

    Each mean divides by the targets of the whole sequences. ``target_counts`` is an identity
    on one process; a plan that splits sequences over ``sequence_shards`` ranks (context
    parallelism) makes it a sum over them, and each rank's share of the mean is its CE sum
    over that count, times the shards (the loop averages the shards' losses)."""

    def __init__(self, blocks: list[nn.Module], dim: int, norm_eps: float, loss_scale: float):
        super().__init__(MTPModule(b, dim, norm_eps) for b in blocks)
        self.loss_scale = loss_scale
        # a plain callable, not a module: a ModuleList iterates its modules as depths
        self.target_counts: Callable[[torch.Tensor], torch.Tensor] = _unchanged
        self.sequence_shards = 1
        self.register_buffer("loss_sum", torch.zeros(()), persistent=False)

    def loss(
        self,
        h_BSD: torch.Tensor,
        inputs: list[torch.Tensor],
        labels_BS: torch.Tensor,
        cos_sin: torch.Tensor,
        head: nn.Module,
        mask: AttentionMask | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L for the main model's last hidden state ``h_BSD`` (before the final norm), the
        depths' ``inputs`` (``mtp_inputs``) and the decoder's output ``head``; ``labels_BS``
        cover whole sequences, of which ``h_BSD`` holds the ``positions`` if given.

        Depth k predicts token t + k + 1 (labels[t + k]) at position t. Sequences keep their
        length S, so MTP blocks run the shapes of the main blocks (a plan may shard or compile
        them alike): inputs past the end are token 0 and their positions are excluded from
        the mean; causal attention keeps them from reaching valid positions. They do pass an
        MoE block's router, so k of every S tokens count in its balance loss and expert load.
        """
        totals, counts = [], []
        for k, (module, emb_BSD) in enumerate(zip(self, inputs), start=1):
            h_BSD = module(h_BSD, emb_BSD, cos_sin, mask)
            logits_TV = head(module.norm(h_BSD)).flatten(0, 1)
            logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
            targets_T = _at(_shift_left(labels_BS, k, _IGNORE), positions).flatten()
            totals.append(
                F.cross_entropy(logits_TV, targets_T, ignore_index=_IGNORE, reduction="sum")
            )
            counts.append((targets_T != _IGNORE).sum())
        # means over the counted targets; none counted (a micro-batch of prompt only) is 0
        counts_D = self.target_counts(torch.stack(counts).to(totals[0].dtype))
        means_D = torch.stack(totals) * self.sequence_shards / counts_D.clamp(min=1)
        loss = means_D.sum() * (self.loss_scale / len(self))
        if self.training and not is_recomputing():  # validation's forwards are not logged
            self.loss_sum.add_(loss.detach())
        return loss

    def init_weights(self, std: float, out_std: float, buffer_device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=buffer_device)
        for module in self:
            module.init_weights(std, out_std)
