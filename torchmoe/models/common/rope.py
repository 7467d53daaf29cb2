"""Rotary position embeddings with DeepSeek's YaRN context extension.

Pairs of adjacent channels (2i, 2i+1) rotate together, as in the DeepSeek reference models.
cos/sin are real tensors (no complex dtype) so the model compiles and shards cleanly.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class RopeArgs:
    head_dim: int  # rotated channels per head (even)
    theta: float = 10000.0
    factor: float = 1.0  # YaRN scale; 1 = plain RoPE
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0


def yarn_softmax_mscale(args: RopeArgs) -> float:
    """Multiplier on the attention softmax scale under YaRN (1.0 without it)."""
    if args.factor <= 1.0:
        return 1.0
    m = 0.1 * args.mscale * math.log(args.factor) + 1.0
    return m * m


def _correction_dim(rotations: float, dim: int, theta: float, seq_len: int) -> float:
    """The channel index whose wavelength completes ``rotations`` turns over ``seq_len``."""
    return dim * math.log(seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def inverse_frequencies(args: RopeArgs) -> torch.Tensor:
    """Per-pair angular frequencies [head_dim / 2], YaRN-interpolated when factor > 1.

    High-frequency pairs (many turns within the original context) keep their frequency,
    low-frequency pairs are divided by ``factor``, and a linear ramp blends the band between.
    """
    dim = args.head_dim
    freqs = 1.0 / (args.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.factor <= 1.0:
        return freqs
    low = max(
        math.floor(_correction_dim(args.beta_fast, dim, args.theta, args.original_seq_len)), 0
    )
    high = min(
        math.ceil(_correction_dim(args.beta_slow, dim, args.theta, args.original_seq_len)), dim - 1
    )
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 where the frequency is kept, 0 where it is interpolated
    return freqs / args.factor * (1 - keep) + freqs * keep


def rope_cos_sin(args: RopeArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin tables stacked as [seq_len, head_dim / 2, 2], float32."""
    freqs = inverse_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, R] by position; cos_sin [>= S, R/2, 2], of which the first S
    positions are used, or [B, S, R/2, 2], each row's own positions (generation with a KV
    cache). Computed in float32."""
    per_row = cos_sin if cos_sin.dim() == 4 else cos_sin[None, : x.shape[1]]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos = per_row[:, :, None, :, 0]
    sin = per_row[:, :, None, :, 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
