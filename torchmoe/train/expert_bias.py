"""Aux-loss-free balancing (DeepSeek-V3) as an explicit step after ``optimizer.step``: each
router's expert bias moves by ``moe.bias_update_rate`` against its experts' load, from the
step's token counts summed over every rank, so all ranks apply the same bias."""

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from torchmoe.models.moe.balance import update_expert_bias
from torchmoe.models.moe.moe import MoE


class ExpertBiasUpdate:
    """The update for ``layers`` (this rank's MoE layers, at ``rows`` of the whole model's),
    and the bias norms the log shows. ``pp_group``: the pipeline ranks, which hold the other
    layers (None without pipeline parallelism)."""

    def __init__(
        self,
        layers: list[MoE],
        rows: list[int],
        num_layers: int,
        rate: float,
        pp_group: ProcessGroup | None,
    ):
        self.layers = [(row, m) for row, m in zip(rows, layers) if m.router.expert_bias is not None]
        self.num_layers = num_layers
        self.rate = rate
        self.pp_group = pp_group

    def update(self, tokens_LE: torch.Tensor) -> None:
        """Move every bias from this step's routed copies per expert [L, E] (whole model)."""
        if self.rate > 0:
            for row, m in self.layers:
                update_expert_bias(m.router.expert_bias, tokens_LE[row], self.rate)

    def norms(self, device: torch.device) -> torch.Tensor:
        """Each layer's bias norm [L] (zero where a layer has no bias), all layers on every
        rank."""
        norm_L = torch.zeros(self.num_layers, device=device)
        for row, m in self.layers:
            norm_L[row] = m.router.expert_bias.norm()
        if self.pp_group is not None:
            dist.all_reduce(norm_L, group=self.pp_group)
        return norm_L
