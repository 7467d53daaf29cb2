"""MoE and multi-token-prediction statistics of one optimizer step.

Each MoE layer sums its routed copies per expert and its ``StepStats`` over the step's forwards
(models/moe/moe.py), and the MTP depths their loss. Here: those buffers -> one all-reduce over
every rank (each fills the rows of the layers its pipeline stages hold, the other rows stay
zero, so the sum has every layer of the whole model) -> named per-layer values of the step
(``step_values``) -> over the steps of a log window, the log row (``moe_log_row``).

Legend (torchmoe/__init__.py): L MoE layers of the whole model (a row each), E experts, Z
step-statistic fields (``StepStats``).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.models.moe.moe import LOSS_NAMES, MoE, StepStats, moe_layers


@dataclass
class ReducedStep:
    """One step's buffers of every layer, summed over ranks (on the device)."""

    tokens_LE: torch.Tensor  # routed copies per expert
    stats: StepStats  # each field [L]
    mtp_loss_sum: torch.Tensor | None  # [] summed over the step's forwards; None without MTP


class MoEStepStats:
    """Collects, reduces and resets the step buffers of the MoE layers and MTP depths that
    ``local`` (the model, or a rank's pipeline stages) holds, laid out by the layers of
    ``whole`` (the whole model, before any split: the layer modules are the same objects)."""

    def __init__(self, whole: nn.Module, local: nn.Module, num_experts: int, reduce: bool):
        row_of = {id(m): row for row, (_, m) in enumerate(moe_layers(whole))}
        self.names = [name for name, _ in moe_layers(whole)]  # by row
        self.num_layers = len(row_of)
        self.layers: list[MoE] = [m for _, m in moe_layers(local)]
        if any(id(m) not in row_of for m in self.layers):
            raise ConfigError(
                "the parallelize plan returned MoE layers that are not the built model's; "
                "a plan (parallelism.plan) must transform the model's modules in place"
            )
        self.rows = [row_of[id(m)] for m in self.layers]
        self.num_experts = num_experts
        self.has_mtp = getattr(whole, "mtp", None) is not None
        self.mtp = getattr(local, "mtp", None)  # None on ranks without the last stage
        self.reduce_over_ranks = reduce
        self._row_index: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.num_layers) or self.has_mtp

    def reduce(self, device: torch.device) -> ReducedStep:
        """Sum this step's buffers over all ranks in one all-reduce, and zero them."""
        L, E, Z = self.num_layers, self.num_experts, len(StepStats._fields)
        counts = torch.zeros(L, E, device=device)
        stats = torch.zeros(L, Z, device=device)
        if self.layers:
            if self._row_index is None:
                self._row_index = torch.tensor(self.rows, dtype=torch.long, device=device)
            counts.index_copy_(
                0, self._row_index, torch.stack([m.tokens_per_expert for m in self.layers]).float()
            )
            stats.index_copy_(
                0, self._row_index, torch.stack([m.stats for m in self.layers]).float()
            )
            torch._foreach_zero_([b for m in self.layers for b in (m.tokens_per_expert, m.stats)])
        mtp = torch.zeros(1 if self.has_mtp else 0, device=device)
        if self.mtp is not None:
            mtp += self.mtp.loss_sum
            self.mtp.loss_sum.zero_()
        flat = torch.cat([counts.flatten(), stats.flatten(), mtp])
        if self.reduce_over_ranks:
            dist.all_reduce(flat)
        counts_LE = flat[: L * E].view(L, E)
        stats_LZ = flat[L * E : L * E + L * Z].view(L, Z)
        return ReducedStep(
            counts_LE, StepStats.unpack(stats_LZ), flat[-1] if self.has_mtp else None
        )


def step_values(
    step: ReducedStep, shards: int, bias_norm_L: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The log's values of one step, by name: routed copies per expert ``tokens`` [L, E]; per
    layer [L], each loss term as its mean over the ``shards`` token shards of the step
    (micro-batches x ranks), the mean router entropy per token, the dropped fraction of the
    copies and the expert-bias norm; the MTP loss (mean over shards). Stays on the device."""
    out: dict[str, torch.Tensor] = {}
    if step.tokens_LE.numel():
        s = step.stats
        out["tokens"] = step.tokens_LE
        out.update({name: getattr(s, name) / shards for name in LOSS_NAMES})
        out["entropy"] = s.entropy_sum / s.tokens.clamp_min(1)
        out["dropped_frac"] = s.dropped / s.copies.clamp_min(1)
        if bias_norm_L is not None:
            out["bias_norm"] = bias_norm_L
    if step.mtp_loss_sum is not None:
        out["mtp_loss"] = step.mtp_loss_sum / shards
    return out


def expert_load_stats(counts_LE: torch.Tensor) -> dict:
    """Per-layer load summary from tokens per expert [layers, experts] over a window."""
    counts = counts_LE.double()
    mean = counts.mean(dim=1).clamp_min(1e-12)
    max_over_mean = counts.max(dim=1).values / mean
    cv = counts.std(dim=1, correction=0) / mean
    dead = (counts == 0).sum(dim=1)
    return {
        "load_max_over_mean": max_over_mean.max().item(),
        "load_cv": cv.mean().item(),
        "dead_experts": int(dead.sum().item()),
        "per_layer": {
            "max_over_mean": max_over_mean.tolist(),
            "cv": cv.tolist(),
            "dead": dead.tolist(),
            "tokens": counts_LE.tolist(),
        },
    }


def moe_log_row(window: dict[str, torch.Tensor], steps: int, dropping: bool) -> dict:
    """Log-row fields from a window of ``step_values``: load summary, per-layer values and
    the total balance loss (summed over layers, mean per step)."""
    row = expert_load_stats(window["tokens"])
    per_layer = row["per_layer"]
    losses = {n: (window[n] / steps).tolist() for n in LOSS_NAMES if window[n].any()}
    per_layer.update(losses)
    per_layer["entropy"] = (window["entropy"] / steps).tolist()
    row["aux_loss"] = sum(sum(v) for v in losses.values())
    row["router_entropy"] = sum(per_layer["entropy"]) / len(per_layer["entropy"])
    if dropping:  # capacity_factor > 0
        per_layer["dropped_frac"] = (window["dropped_frac"] / steps).tolist()
        row["dropped_frac"] = sum(per_layer["dropped_frac"]) / len(per_layer["dropped_frac"])
    if "bias_norm" in window:
        per_layer["bias_norm"] = (window["bias_norm"] / steps).tolist()
    return row
