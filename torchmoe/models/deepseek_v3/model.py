"""DeepSeek-V3 family (and DeepSeek-V2, which shares it): MLA attention, the blocks that
``moe_layers`` selects (all after the first ``n_dense_layers`` by default) MoE with shared
experts, the rest dense SwiGLU; optionally ``mtp_num_layers`` multi-token prediction depths,
whose blocks are MoE when the last block is."""

from dataclasses import dataclass

from torchmoe.models.common.transformer import Decoder, DecoderArgs, build_decoder
from torchmoe.models.deepseek_v3.mla import MLA, MLAArgs


@dataclass(kw_only=True)
class DeepSeekV3Args(DecoderArgs):
    mla: MLAArgs


def build_deepseek_v3(args: DeepSeekV3Args) -> Decoder:
    """The model ``args`` describe; call under ``torch.device("meta")`` to allocate nothing."""
    return build_decoder(args, lambda: MLA(args.mla))
