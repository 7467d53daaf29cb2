"""A pre-norm decoder that model families fill with their attention and feed-forward modules,
optionally followed by DeepSeek-V3's multi-token prediction (MTP) modules.

Layers live in a ModuleDict keyed by their index, so a pipeline split can drop some of them and
every remaining parameter keeps its name (checkpoints stay loadable across layouts). Embedding,
final norm and output head may be None for the same reason; so may ``mtp``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchmoe.models.common.init import trunc_normal_
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import RopeArgs, rope_cos_sin
from torchmoe.models.moe.balance import attach_aux_loss
from torchmoe.models.moe.moe import is_recomputing

_IGNORE = -100  # cross-entropy target of positions whose token lies past the sequence


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


class MTPModule(nn.Module):
    """One depth of multi-token prediction: h' = block(eh_proj([enorm(e); hnorm(h)])), where h
    is the previous depth's hidden state [B, S, D] and e the embedding of the token this depth
    adds. Its logits are output(norm(h')), with the decoder's shared output head.

    The embedding half comes first in the concatenation, as in DeepSeek-V3's released
    weights (``eh_proj`` is [D, 2D]), so they load without reordering columns.
    """

    def __init__(self, block: TransformerBlock, dim: int, norm_eps: float):
        super().__init__()
        self.enorm = RMSNorm(dim, eps=norm_eps)
        self.hnorm = RMSNorm(dim, eps=norm_eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.norm = RMSNorm(dim, eps=norm_eps)

    def forward(
        self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        """The next depth's hidden state (before ``norm``)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x, cos_sin)

    def init_weights(self, std: float, out_std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        trunc_normal_(self.eh_proj.weight, std)
        self.block.init_weights(std, out_std)


def _shift_left(tokens_BS: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """tokens[:, t + n] at position t; the last n positions get ``fill``."""
    return F.pad(tokens_BS[:, n:], (0, n), value=fill) if n else tokens_BS


def block_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every transformer block: ``model.layers`` in order, then each MTP
    depth's block. Plans wrap or replace blocks through these (FSDP, checkpointing, compile)."""
    slots = [(model.layers, name) for name in model.layers.keys()]
    return slots + [(module, "block") for module in getattr(model, "mtp", None) or ()]


class Decoder(nn.Module):
    """Embedding -> blocks -> final norm -> output head, plus ``len(mtp_blocks)`` MTP depths.

    With MTP, ``forward(tokens, labels)`` also computes the MTP loss
    L = mtp_loss_scale / D * sum_k mean CE_k and hooks it onto the returned logits like a
    balance loss (``attach_aux_loss``): backward through the logits trains the MTP modules
    too. ``mtp_loss_sum`` adds up L over real forwards (not activation-checkpoint
    recomputation) for the training loop to log and reset.

    A pipeline split may drop the embedding (later stages take hidden states) and the head
    (earlier stages return them). MTP's inputs, the embeddings of the shifted labels, are then
    made by the first stage and travel with the hidden state, concatenated on its last dim, to
    the last stage, which holds the MTP modules: no stage needs a copy of the embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        blocks: list[TransformerBlock],
        norm_eps: float,
        rope: RopeArgs,
        max_seq_len: int,
        mtp_blocks: list[TransformerBlock] | None = None,
        mtp_loss_scale: float = 0.0,
    ):
        super().__init__()
        self.rope = rope
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.mtp_depth = len(mtp_blocks or ())
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        # after the head, so models without MTP initialise exactly as before it existed
        self.mtp = (
            nn.ModuleList(MTPModule(b, dim, norm_eps) for b in mtp_blocks) if mtp_blocks else None
        )
        self.mtp_loss_scale = mtp_loss_scale
        self.register_buffer("rope_cos_sin", rope_cos_sin(rope, max_seq_len), persistent=False)
        self.register_buffer("mtp_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] int64 (or, on a later pipeline stage, hidden states [B, S, D] followed
        by the MTP inputs on the last dim); labels [B, S], the tokens shifted left by one,
        only needed for multi-token prediction."""
        # every position: a later pipeline stage may get a sequence shard (tensor parallel)
        cos_sin = self.rope_cos_sin
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.mtp_depth and labels is None and self.output is None:
                raise ValueError(
                    "the first pipeline stage of a model with multi-token "
                    "prediction needs the labels: the last stage reads them"
                )
            mtp_inputs = self.mtp_inputs(labels) if self.mtp_depth and labels is not None else []
        else:
            h, *mtp_inputs = tokens.split(self.dim, dim=-1)
        for layer in self.layers.values():
            h = layer(h, cos_sin)
        if self.output is None:  # an earlier pipeline stage
            return torch.cat([h, *mtp_inputs], dim=-1) if mtp_inputs else h
        out = self.output(self.norm(h) if self.norm is not None else h)
        if self.mtp is not None and labels is not None:
            out = attach_aux_loss(out, self.mtp_loss(h, labels, mtp_inputs, cos_sin))
        return out

    def mtp_inputs(self, labels_BS: torch.Tensor) -> list[torch.Tensor]:
        """What depth k (1-based) reads at position t: the embedding of token t + k
        (labels[t + k - 1]); past the end, of token 0."""
        return [
            self.tok_embeddings(_shift_left(labels_BS, k - 1, 0))
            for k in range(1, self.mtp_depth + 1)
        ]

    def mtp_loss(
        self,
        h_BSD: torch.Tensor,
        labels_BS: torch.Tensor,
        inputs: list[torch.Tensor],
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        """L for the main model's last hidden state ``h_BSD`` (before the final norm) and the
        depths' ``inputs`` (``mtp_inputs``).

        Depth k predicts token t + k + 1 (labels[t + k]) at position t. Sequences keep their
        length S, so MTP blocks run the shapes of the main blocks (a plan may shard or compile
        them alike): inputs past the end are token 0 and their positions are excluded from
        the mean; causal attention keeps them from reaching valid positions. They do pass an
        MoE block's router, so k of every S tokens count in its balance loss and expert load.
        """
        losses = []
        for k, (module, emb_BSD) in enumerate(zip(self.mtp, inputs), start=1):
            h_BSD = module(h_BSD, emb_BSD, cos_sin)
            logits_TV = self.output(module.norm(h_BSD)).flatten(0, 1)
            logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
            losses.append(
                F.cross_entropy(
                    logits_TV, _shift_left(labels_BS, k, _IGNORE).flatten(), ignore_index=_IGNORE
                )
            )
        loss = torch.stack(losses).sum() * (self.mtp_loss_scale / len(self.mtp))
        if not is_recomputing():
            self.mtp_loss_sum.add_(loss.detach())
        return loss

    @torch.no_grad()
    def init_weights(
        self, init_std: float, n_layers: int, buffer_device: torch.device | None = None
    ) -> None:
        """Initialise every parameter and buffer in place (see models/common/init.py); call
        after ``to_empty`` when the model was built on the meta device."""
        device = buffer_device or self.rope_cos_sin.device
        self.rope_cos_sin = rope_cos_sin(self.rope, self.max_seq_len, device)
        self.mtp_loss_sum = torch.zeros((), device=device)
        out_std = init_std / math.sqrt(2 * n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for layer in self.layers.values():
            layer.init_weights(init_std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            trunc_normal_(self.output.weight, self.output.weight.shape[1] ** -0.5)
        for module in self.mtp or ():
            module.init_weights(init_std, out_std)
