"""Mixtral family: the GQA decoder (models/llama/model.py) with, in every block, 8 experts and
top-2 softmax routing (softmax over all experts, then the two weights renormalised, which
equals Mixtral's softmax over the two chosen logits) and a Switch-style auxiliary loss; no
shared experts. ``moe.layer_freq`` or ``model.n_dense_layers`` may make some blocks dense
SwiGLUs of ``model.inter_dim``. Its flavors (flavors.py) set these keys.
"""

from torchmoe.models.common.transformer import Decoder
from torchmoe.models.llama.model import GQADecoderArgs, build_gqa_decoder


def build_mixtral(args: GQADecoderArgs) -> Decoder:
    """The model ``args`` describe; call under ``torch.device("meta")`` to allocate nothing."""
    return build_gqa_decoder(args)
