"""apply_balance_counts: balance losses count expert assignments beyond one rank's tokens.

Each MoE layer has two count reductions, identities on one process (moe.py); this plan makes
them all-reduces of the per-expert counts:

- ``batch_counts`` over the context- and tensor-parallel ranks, which hold the other parts of
  the same micro-batch's sequences: aux_loss and seq_aux_loss then count whole sequences, as on
  one process;
- ``global_counts`` over every rank that routes other tokens of the step (data x context x
  tensor parallel), for the global aux loss.

Counts carry no gradient, so backward needs nothing; each rank's loss still differentiates only
its own tokens' probabilities, and averaging the losses over ranks (the training loop's loss
scale) gives the single-process loss.
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

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return all_reduce(counts, "sum", self.group)


def apply_balance_counts(
    model: nn.Module, token_mesh: DeviceMesh, sequence_mesh: DeviceMesh | None
) -> None:
    """Install the count all-reduces (module docstring) in every MoE layer whose losses need
    them: ``token_mesh`` (dp x cp x tp) for the global aux loss, ``sequence_mesh`` (cp x tp;
    None or size 1: nothing to sum) for the per-micro-batch and per-sequence losses."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        coeffs = moe.args.balance_coeffs
        if "global_aux_loss" in coeffs and token_mesh.size() > 1:
            moe.global_counts = AllReduceCounts(token_mesh)
        per_sequence = "aux_loss" in coeffs or "seq_aux_loss" in coeffs
        if sequence_mesh is not None and sequence_mesh.size() > 1 and per_sequence:
            moe.batch_counts = AllReduceCounts(sequence_mesh)
