"""Held-out loss every ``validation.freq`` steps: the same ``validation.steps`` global batches
each time, in eval mode (no router jitter, the eval capacity), summed over every token on every
rank, so the value is the same at every layout (data: loader.py's global order; weights: the
layout-independent init). Under pipeline parallelism the batches run forward only through the
schedule and the ranks of the last stage count the labels; under context parallelism each rank
counts the labels of its own chunks."""

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from torchmoe.data.prefetch import Batch, Prefetcher

# one batch (on the device) -> the summed token loss on this rank and the labels it counts (both
# zero where a pipeline rank holds no last stage)
SummedLoss = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


class Validator:
    """``run()`` the held-out loss; ``history`` keeps (step, loss) of this process."""

    def __init__(
        self,
        batches: Prefetcher,
        steps: int,
        summed_loss: SummedLoss,
        device: torch.device,
    ) -> None:
        self.batches, self.steps, self.summed_loss = batches, steps, summed_loss
        self.device = device
        self._start = batches.state_dict()  # every run reads the same batches
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        self.batches.load_state_dict(self._start)
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for _ in range(self.steps):
                batch = next(self.batches).to(self.device)
                loss, labeled = self.summed_loss(batch)
                sums += torch.stack([loss.double(), labeled.to(sums)])
        finally:
            model.train()
        if dist.is_initialized():  # ranks of one data-parallel index add the same pair (tp),
            dist.all_reduce(sums)  # or shares of it (cp, pp): the ratio is the batches' own
        loss = (sums[0] / sums[1]).item()
        self.history.append((step, loss))
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    def close(self) -> None:
        self.batches.close()
