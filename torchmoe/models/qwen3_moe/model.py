"""Qwen3-MoE family: the GQA decoder (models/llama/model.py) with per-head q/k RMSNorm before
the rotary embedding, and in every block 128 fine-grained experts with top-8 softmax routing
(the eight weights renormalised: ``norm_topk_prob``), no shared experts, and a Switch-style
auxiliary loss (its flavors, flavors.py, set these keys).

Hugging Face's Qwen3-MoE averages its auxiliary loss over layers and counts top-k assignments
without dividing by k; here each MoE layer adds coeff x its own Switch loss (1 = uniform), so
the same ``router_aux_loss_coef`` weighs balance n_layers / k times as much.
"""

from dataclasses import replace

from torchmoe.models.common.transformer import Decoder
from torchmoe.models.llama.model import GQADecoderArgs, build_gqa_decoder


def build_qwen3_moe(args: GQADecoderArgs) -> Decoder:
    """The model ``args`` describe, with q/k norms; call under ``torch.device("meta")``."""
    return build_gqa_decoder(replace(args, attention=replace(args.attention, qk_norm=True)))
