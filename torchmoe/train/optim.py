"""AdamW and the warm-up + decay learning-rate schedule."""

import math

import torch
from torch import nn

from torchmoe.config.schema import LRScheduler, Optimizer
from torchmoe.train.adamw import AdamW


def resolve_implementation(cfg: Optimizer, device: torch.device, cached_weights: bool) -> str:
    """``optimizer.implementation`` for this run: auto = torchmoe's AdamW on CUDA, with
    bfloat16 moments or with cached weights (only it updates their copies), else foreach."""
    if cfg.implementation != "auto":
        return cfg.implementation
    ours = device.type == "cuda" or cfg.state_dtype != "float32" or cached_weights
    return "torchmoe" if ours else "foreach"


def build_optimizer(
    model: nn.Module, cfg: Optimizer, device: torch.device, cached_weights: bool = False
) -> torch.optim.Optimizer:
    """AdamW with no weight decay on 1-D parameters (norm weights, biases). The expert bias is a
    buffer moved by its own rule, so the optimizer never sees it."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    impl = resolve_implementation(cfg, device, cached_weights)
    if impl == "torchmoe":
        return AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            state_dtype=getattr(torch, cfg.state_dtype),
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def lr_factor(step: int, total_steps: int, cfg: LRScheduler) -> float:
    """Multiplier on the peak LR after ``step`` optimizer steps: linear warm-up, an optional
    stable phase, then cosine or linear decay to ``min_lr_factor``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = total_steps - cfg.warmup_steps
    if cfg.decay_ratio >= 0:
        decay_steps = round(total_steps * cfg.decay_ratio)
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)  # never decay during warm-up
    decay_steps = total_steps - decay_start
    if cfg.decay_type == "constant" or step < decay_start or decay_steps <= 0:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a scheduler, so its position is saved with checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
