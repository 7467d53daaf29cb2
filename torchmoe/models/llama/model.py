"""Llama family: grouped-query attention and dense SwiGLU blocks (Llama 3). It is also the GQA
decoder Mixtral and Qwen3-MoE build on: blocks that ``moe_layers`` selects (none in a dense
model) get an MoE layer instead of the dense SwiGLU.

Rotary embeddings rotate adjacent channel pairs (as every torchmoe model does); importing
Hugging Face weights, whose rotation pairs channel i with i + head_dim / 2, permutes the q/k
rows of each head (and, with q/k norms, their weights alike).
"""

from dataclasses import dataclass

from torchmoe.models.common.attention import GQA, GQAArgs
from torchmoe.models.common.transformer import Decoder, DecoderArgs, build_decoder


@dataclass(kw_only=True)
class GQADecoderArgs(DecoderArgs):
    attention: GQAArgs


def build_gqa_decoder(args: GQADecoderArgs) -> Decoder:
    """The GQA model ``args`` describe; call under ``torch.device("meta")`` to allocate
    nothing."""
    return build_decoder(args, lambda: GQA(args.attention))


def build_llama(args: GQADecoderArgs) -> Decoder:
    """The Llama model ``args`` describe."""
    return build_gqa_decoder(args)
