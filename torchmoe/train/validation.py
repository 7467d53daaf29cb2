"""Held-out loss every ``validation.freq`` steps: the same ``validation.steps`` global batches
each time, in eval mode (no router jitter, the eval capacity), summed over every token on every
rank, so the value is the same at every layout (data: loader.py's global order; weights: the
layout-independent init)."""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchmoe.data.loader import IGNORE
from torchmoe.data.prefetch import Prefetcher
from torchmoe.train.loss import LossFn


class Validator:
    """``run()`` the held-out loss; ``history`` keeps (step, loss) of this process."""

    def __init__(
        self,
        batches: Prefetcher,
        steps: int,
        loss_fn: LossFn,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        tensor_parallel: bool,
    ) -> None:
        self.batches, self.steps, self.loss_fn = batches, steps, loss_fn
        self.device, self.autocast_dtype, self.tp = device, autocast_dtype, tensor_parallel
        self._start = batches.state_dict()  # every run reads the same batches
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        self.batches.load_state_dict(self._start)
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for _ in range(self.steps):
                inputs, labels, documents = (
                    t if t is None else t.to(self.device) for t in next(self.batches)
                )
                kwargs = {} if documents is None else {"document_ids": documents}
                with (
                    torch.autocast(
                        self.device.type,
                        dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None,
                    ),
                    loss_parallel() if self.tp else nullcontext(),
                ):
                    loss = self.loss_fn(model(inputs, **kwargs), labels)
                if isinstance(loss, DTensor):
                    loss = loss.full_tensor()
                labeled = (labels != IGNORE).sum()  # prompts and user turns are no labels
                sums += torch.stack([loss.double(), labeled.to(sums)])
        finally:
            model.train()
        if dist.is_initialized():  # ranks of one data-parallel index add the same pair: the
            dist.all_reduce(sums)  # ratio is unchanged
        loss = (sums[0] / sums[1]).item()
        self.history.append((step, loss))
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    def close(self) -> None:
        self.batches.close()
