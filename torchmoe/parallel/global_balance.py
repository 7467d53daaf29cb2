"""apply_global_counts: the global aux loss counts expert assignments over the whole batch.

Each MoE layer's ``global_counts`` (the identity on one process) becomes an all-reduce of the
per-expert counts over the ranks that route different tokens of the step (data parallel x
tensor parallel). The counts carry no gradient, so backward needs nothing; each rank's loss
still differentiates only its own tokens' probabilities, and averaging the losses over ranks
gives the single-process loss of the whole batch.
"""

import torch
from torch import nn
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.device_mesh import DeviceMesh

from torchmoe.models.moe.moe import MoE


class AllReduceCounts(nn.Module):
    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.group = mesh.get_group()

    def forward(self, counts_E: torch.Tensor) -> torch.Tensor:
        return all_reduce(counts_E, "sum", self.group)


def apply_global_counts(model: nn.Module, token_mesh: DeviceMesh) -> None:
    """Sum expert counts over ``token_mesh`` in every MoE layer that uses the global aux loss."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if "global_aux_loss" in moe.args.balance_coeffs:
            moe.global_counts = AllReduceCounts(token_mesh)
