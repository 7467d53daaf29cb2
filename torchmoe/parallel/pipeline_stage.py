"""A pipeline stage's part of the decoder, and a rank's stages seen as one set of parameters.

A stage is the model itself with the other stages' blocks dropped (the decoder keeps its blocks
in a ModuleDict keyed by index) and its class swapped for ``DecoderStage``, as expert
parallelism swaps the MoE layer's class: parameter names do not change, so checkpoints load
across pipeline layouts and every plan step applies to a stage as to a whole model.

Legend (torchmoe/__init__.py): B micro-batch, S sequence (a tensor-parallel shard between stages), D
model dim.
"""

import copy

import torch
from torch import nn

from torchmoe.models.common.document_mask import document_mask
from torchmoe.models.common.transformer import Decoder


class DecoderStage(Decoder):
    """One stage: the first embeds (``tok_embeddings`` kept), the last runs the final norm,
    the output head and the MTP depths (``norm``, ``output``, ``mtp`` kept); the others get
    the hidden state and return it. MTP's inputs, the embeddings of the shifted labels, are
    made by the first stage and travel with the hidden state, concatenated on its last dim, to
    the last stage: no stage needs a copy of the embedding. The labels reach the last stage as
    a schedule keyword argument, as they reach the loss. ``positions``, set by the pipeline
    builder under context parallelism, are the places of the whole sequences this rank's
    stages compute (``Decoder.forward``); None computes every place."""

    positions: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, S] into the first stage, hidden states [B, S, D x (1 + MTP depth)]
        into the others; logits out of the last, hidden states (and MTP inputs) otherwise.
        ``document_ids`` (block-causal attention) reach every stage as a schedule keyword
        argument; each builds its mask from them."""
        if self.tok_embeddings is not None:
            if self.mtp_depth and labels is None and self.output is None:
                raise ValueError(
                    "the first pipeline stage of a model with multi-token prediction needs "
                    "the labels: the last stage reads them"
                )
            positions = self.positions
            h_BSD = self.tok_embeddings(x if positions is None else x[:, positions])
            mtp = [] if labels is None else self.mtp_inputs(x, labels, positions)
        else:
            h_BSD, *mtp = x.split(self.dim, dim=-1)
        mask = document_mask(document_ids, self.positions)
        cos_sin = None if self.positions is None else self.rope_cos_sin[self.positions]
        h_BSD = self.run_layers(h_BSD, mask, cos_sin)
        if self.output is None:
            return torch.cat([h_BSD, *mtp], dim=-1) if mtp else h_BSD
        return self.head(h_BSD, labels, mtp, mask, self.positions)


def split_stage(model: Decoder, layout: list[int], stage: int) -> DecoderStage:
    """The part of ``model`` (on the meta device) that ``stage`` runs under ``layout`` (blocks
    per stage): a copy of the model without the other stages' blocks, and without the
    embedding / head unless first / last."""
    layers = model.layers
    # the blocks and MTP depths are shared, not copied: each belongs to one stage, and the
    # training loop finds its MoE layers among the whole model's by identity
    shared = {id(m): m for m in (model.layers, model.mtp) if m is not None}
    part = copy.deepcopy(model, memo=shared)
    part.__class__ = DecoderStage
    start = sum(layout[:stage])
    keys = list(layers.keys())[start : start + layout[stage]]
    part.layers = nn.ModuleDict({k: layers[k] for k in keys})
    if stage > 0:
        part.tok_embeddings = None
    if stage < len(layout) - 1:
        part.norm = part.output = part.mtp = None
    return part


class LocalStages(nn.Module):
    """The stages this rank holds, as one module with the whole model's parameter names: what
    the optimizer, checkpoints, clipping, freezing and metrics see. It has no forward: the
    schedule runs the stages."""

    def __init__(self, parts: list[DecoderStage]):
        super().__init__()
        blocks = {k: b for part in parts for k, b in part.layers.items()}
        self.layers = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        for name in ("tok_embeddings", "norm", "output", "mtp"):
            held = [getattr(p, name) for p in parts if getattr(p, name) is not None]
            setattr(self, name, held[0] if held else None)
