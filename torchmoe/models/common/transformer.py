"""A pre-norm decoder that model families fill with their attention and feed-forward modules.

Layers live in a ModuleDict keyed by their index, so a pipeline split can drop some of them and
every remaining parameter keeps its name (checkpoints stay loadable across layouts). Embedding,
final norm and output head may be None for the same reason.
"""

import math

import torch
from torch import nn

from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import RopeArgs, rope_cos_sin


class TransformerBlock(nn.Module):
    def __init__(self, attention: nn.Module, feed_forward: nn.Module, dim: int, norm_eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = feed_forward  # dense FeedForward or MoE

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos_sin)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, blocks: list[TransformerBlock],
                 norm_eps: float, rope: RopeArgs, max_seq_len: int):
        super().__init__()
        self.rope = rope
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope_cos_sin", rope_cos_sin(rope, max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] int64 (or hidden states [B, S, D] on a later pipeline stage)."""
        cos_sin = self.rope_cos_sin[: tokens.shape[1]]  # before a plan may shard the sequence
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, cos_sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, init_std: float, n_layers: int, buffer_device: torch.device | None = None
                     ) -> None:
        """Initialise every parameter and buffer in place (see models/common/init.py); call
        after ``to_empty`` when the model was built on the meta device."""
        device = buffer_device or self.rope_cos_sin.device
        self.rope_cos_sin = rope_cos_sin(self.rope, self.max_seq_len, device)
        out_std = init_std / math.sqrt(2 * n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for layer in self.layers.values():
            layer.init_weights(init_std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            trunc_normal_(self.output.weight, self.output.weight.shape[1] ** -0.5)
