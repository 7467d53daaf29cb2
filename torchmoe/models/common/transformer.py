"""A pre-norm decoder that model families fill with their attention and feed-forward modules,
optionally followed by DeepSeek-V3's multi-token prediction (MTP, mtp.py).

Legend (torchmoe/__init__.py): B batch, S sequence, D model dim, V vocabulary.

Blocks live in a ModuleDict keyed by their index, so a pipeline split (parallel/) can drop some
of them and every remaining parameter keeps its name (checkpoints stay loadable across layouts).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchmoe.models.common.document_mask import AttentionMask, document_mask
from torchmoe.models.common.init import normal_, trunc_normal_
from torchmoe.models.common.kv_cache import KVCache, LayerCache
from torchmoe.models.common.mlp import FeedForward
from torchmoe.models.common.mtp import MultiTokenPrediction, mtp_inputs
from torchmoe.models.common.norms import RMSNorm
from torchmoe.models.common.rope import RopeArgs, rope_cos_sin
from torchmoe.models.moe.balance import attach_aux_loss
from torchmoe.models.moe.moe import MoE, MoEArgs


@dataclass(kw_only=True)
class DecoderArgs:
    """What every family's decoder takes; a family adds its attention's arguments."""

    vocab_size: int
    dim: int
    inter_dim: int  # hidden size of the dense SwiGLU blocks
    norm_eps: float
    rope: RopeArgs
    max_seq_len: int  # positions the rotary table covers
    moe: MoEArgs  # the routed experts of every MoE block
    moe_layers: list[bool]  # per block: MoE (True) or dense SwiGLU
    mtp_num_layers: int = 0  # multi-token prediction depths; their blocks copy the last block's
    mtp_loss_scale: float = 0.0


class TransformerBlock(nn.Module):
    def __init__(self, attention: nn.Module, feed_forward: nn.Module, dim: int, norm_eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = feed_forward  # dense FeedForward or MoE

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        mask: AttentionMask | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """``mask`` None is causal attention; a document mask (document_mask.py) also keeps
        packed documents apart. Passed positionally, always: tensor parallelism prepares the
        attention's inputs by position. ``cache``: generation's (kv_cache.py)."""
        x = x + self.attention(self.attention_norm(x), cos_sin, mask, cache=cache)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


def block_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every transformer block: ``model.layers`` in order, then each MTP
    depth's block. Plans wrap or replace blocks through these (FSDP, checkpointing, compile)."""
    slots = [(model.layers, name) for name in model.layers.keys()]
    return slots + [(module, "block") for module in getattr(model, "mtp", None) or ()]


class Decoder(nn.Module):
    """Embedding -> blocks -> final norm -> output head, plus ``len(mtp_blocks)`` MTP depths.

    With MTP, ``forward(tokens, labels)`` also computes the MTP loss and hooks it onto the
    returned logits like a balance loss (``attach_aux_loss``): backward through the logits
    trains the MTP depths too.
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
            MultiTokenPrediction(mtp_blocks, dim, norm_eps, mtp_loss_scale) if mtp_blocks else None
        )
        self.register_buffer("rope_cos_sin", rope_cos_sin(rope, max_seq_len), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] of tokens [B, S] (int64). ``labels`` [B, S], the tokens shifted
        left by one, are needed only for multi-token prediction. ``document_ids`` [B, S], the
        packed document each position belongs to, make attention block-causal: a token sees
        only its own document (document_mask.py); None is plain causal attention. With a
        ``cache`` (generation, kv_cache.py) the tokens sit at ``cache.positions`` after the
        cached ones.

        ``positions`` [P] computes only the tokens at those places of the sequences (a
        context-parallel rank's chunks): ``tokens``, ``labels`` and ``document_ids`` still
        cover whole sequences (MTP reads tokens past a chunk's end), the logits are [B, P, V],
        and attention runs these queries over keys at every position, whose keys and values
        from the other places a context-parallel plan supplies."""
        if cache is not None:
            h_BSD = self.tok_embeddings(tokens)
            cos_sin = self.rope_cos_sin[cache.positions]  # each row's own positions
            for layer, layer_cache in zip(self.layers.values(), cache.layers, strict=True):
                h_BSD = layer(h_BSD, cos_sin, None, layer_cache)
            return self.head(h_BSD, None, [])
        mtp = [] if labels is None else self.mtp_inputs(tokens, labels, positions)
        mask = document_mask(document_ids, positions)
        h_BSD = self.tok_embeddings(tokens if positions is None else tokens[:, positions])
        cos_sin = None if positions is None else self.rope_cos_sin[positions]
        return self.head(self.run_layers(h_BSD, mask, cos_sin), labels, mtp, mask, positions)

    def run_layers(
        self,
        h_BSD: torch.Tensor,
        mask: AttentionMask | None = None,
        cos_sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The blocks, in order, over the residual stream. Without ``cos_sin`` (the rotary
        rows of given positions) every position of the rotary table goes in: a block may get
        a sequence shard (tensor parallel) and slices it."""
        cos_sin = self.rope_cos_sin if cos_sin is None else cos_sin
        for layer in self.layers.values():
            h_BSD = layer(h_BSD, cos_sin, mask)
        return h_BSD

    def mtp_inputs(
        self,
        tokens_BS: torch.Tensor,
        labels_BS: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The MTP depths' inputs (mtp.py), empty without MTP."""
        return mtp_inputs(self.tok_embeddings, tokens_BS, labels_BS, self.mtp_depth, positions)

    def head(
        self,
        h_BSD: torch.Tensor,
        labels_BS: torch.Tensor | None,
        mtp: list[torch.Tensor],
        mask: AttentionMask | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final norm and output head; with labels, the MTP loss rides on the logits."""
        logits = self.output(self.norm(h_BSD))
        if self.mtp is not None and labels_BS is not None:
            cos_sin = self.rope_cos_sin if positions is None else self.rope_cos_sin[positions]
            loss = self.mtp.loss(h_BSD, mtp, labels_BS, cos_sin, self.output, mask, positions)
            logits = attach_aux_loss(logits, loss)
        return logits

    @torch.no_grad()
    def init_weights(
        self, init_std: float, n_layers: int, buffer_device: torch.device | None = None
    ) -> None:
        """Initialise every parameter and buffer in place (see models/common/init.py); call
        after ``to_empty`` when the model was built on the meta device. Initialises the parts
        the module holds (a pipeline stage holds some), in the order they were registered."""
        device = buffer_device or self.rope_cos_sin.device
        self.rope_cos_sin = rope_cos_sin(self.rope, self.max_seq_len, device)
        out_std = init_std / math.sqrt(2 * n_layers)
        for name, part in self.named_children():
            if name == "tok_embeddings":
                normal_(part.weight, 1.0)
            elif name == "layers":
                for layer in part.values():
                    layer.init_weights(init_std, out_std)
            elif name == "norm":
                part.reset_parameters()
            elif name == "output":
                trunc_normal_(part.weight, part.weight.shape[1] ** -0.5)
            elif name == "mtp":
                part.init_weights(init_std, out_std, device)


def build_decoder(args: DecoderArgs, attention: Callable[[], nn.Module]) -> Decoder:
    """The decoder ``args`` describe, each block with a fresh ``attention()``; call under
    ``torch.device("meta")`` to allocate nothing."""

    def block(is_moe: bool) -> TransformerBlock:
        ffn = MoE(args.moe) if is_moe else FeedForward(args.dim, args.inter_dim)
        return TransformerBlock(attention(), ffn, args.dim, args.norm_eps)

    return Decoder(
        args.vocab_size,
        args.dim,
        [block(is_moe) for is_moe in args.moe_layers],
        args.norm_eps,
        args.rope,
        args.max_seq_len,
        mtp_blocks=[block(args.moe_layers[-1]) for _ in range(args.mtp_num_layers)],
        mtp_loss_scale=args.mtp_loss_scale,
    )
