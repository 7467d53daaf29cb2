"""Float8 training of the dense linears and the routed experts' grouped GEMMs, through torchao
or torchmoe's own float8 GEMMs with a bfloat16 weight gradient."""

from torch import nn

from torchmoe.config.schema import Quantize
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.models.moe.moe import MoE
from torchmoe.quant.float8_grouped_mm import float8_grouped_mm
from torchmoe.quant.float8_linear import Float8Linear

# float8 grouped GEMMs want every expert's row count padded to a multiple of this.
FLOAT8_GROUP_ALIGNMENT = 16


def apply_float8_linears(model: nn.Module, cfg: Quantize) -> None:
    """Swap nn.Linear modules for float8 ones - torchao's Float8Linear, or torchmoe's
    (``float8_linear_weight_grad = "bfloat16"``, ``float8_linear.py``) - except those whose
    name contains an entry of ``float8_exclude`` (the output head and router by default) and
    those whose shapes float8 GEMMs cannot take (dims not divisible by 16)."""
    if not cfg.float8_linear:
        return

    def eligible(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
            return False
        if any(x in fqn for x in cfg.float8_exclude):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    if cfg.float8_linear_weight_grad == "bfloat16":
        swaps = [(n, m) for n, m in model.named_modules() if eligible(m, n)]
        for fqn, linear in swaps:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent), name, Float8Linear.from_linear(linear))
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name(cfg.float8_recipe),
        module_filter_fn=eligible,
    )


def apply_float8_experts(model: nn.Module, cfg: Quantize) -> None:
    """Run every routed expert's grouped GEMMs in float8 with rowwise scales; master weights
    and gradients stay in high precision. ``float8_experts_weight_grad``: "float8" wraps the
    expert weights in torchao's float8 training tensor, which turns each ``torch._grouped_mm``
    on them into torchao's float8 grouped GEMM; "bfloat16" sets the experts' ``grouped_mm`` to
    torchmoe's (``float8_grouped_mm.py``: bf16 weight gradient). The dispatcher pads each
    expert's rows to 16, as both need. Touches ``MoE.experts`` and
    ``MoE.dispatcher.pad_multiple``; run it before expert parallelism."""
    if not cfg.float8_experts:
        return
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if cfg.float8_experts_weight_grad == "bfloat16":
        for moe in moes:
            moe.experts.grouped_mm = float8_grouped_mm
    else:
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig
        from torchao.quantization import quantize_

        quantize_(
            model,
            Float8TrainingOpConfig(),
            filter_fn=lambda module, _fqn: isinstance(module, GroupedExperts),
        )
    for moe in moes:
        moe.dispatcher.pad_multiple = FLOAT8_GROUP_ALIGNMENT
