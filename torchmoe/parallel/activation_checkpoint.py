"""apply_ac: activation checkpointing of transformer blocks, applied from outside the model."""

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from torchmoe.config.schema import ActivationCheckpoint


def apply_ac(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    """mode = "full": wrap every block of ``model.layers`` so its activations are recomputed in
    backward (non-reentrant, so it composes with compile and FSDP). MoE layers skip their
    token counting during the recomputation, and the router picks the same experts again
    because the expert bias only changes after the optimizer step."""
    if cfg.mode == "none":
        return
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
