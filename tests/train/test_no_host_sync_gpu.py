"""On a GPU a training step waits on the device once, on purpose (the loss and gradient norm the
non-finite check and the log read). Forward, backward, the gradient norm and torchmoe's AdamW
update queue their work without a host sync: CUDA's sync debug mode raises on any."""

import pytest
import torch

from torchmoe.parallel.grad_norm import grad_norm_and_clip_coef
from torchmoe.train.trainer import Trainer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_forward_backward_and_update_make_no_host_sync(tiny_config, compiled):
    trainer = Trainer(
        tiny_config(**{"compile.enable": str(compiled).lower(), "moe.grouped_mm": "grouped_mm"})
    )
    assert trainer.optimizer.takes_grad_scale  # torchmoe's AdamW, the CUDA default
    trainer.train_step()  # compile, autotune and the allocator's first blocks may sync
    batch = next(trainer.batches).to(trainer.device)
    params = list(trainer.model.parameters())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.cached_weights is not None:
            trainer.cached_weights.zero_grad()
        trainer._forward_backward(*batch)
        grads = (
            trainer.cached_weights.grads(params)
            if trainer.cached_weights is not None
            else [p.grad for p in params if p.grad is not None]
        )
        _, coef = grad_norm_and_clip_coef(grads, 1.0, None, trainer.device)
        copies = trainer.cached_weights.copies if trainer.cached_weights is not None else None
        trainer.optimizer.step(grad_scale=coef, copies=copies)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
