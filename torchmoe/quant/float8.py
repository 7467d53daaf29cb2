"""Float8 training of dense linears through torchao."""

from torch import nn

from torchmoe.config.schema import Quantize


def apply_float8_linears(model: nn.Module, cfg: Quantize) -> None:
    """Swap nn.Linear modules for torchao's Float8Linear, except those whose name contains an
    entry of ``float8_exclude`` (the output head and router by default) and those whose shapes
    float8 GEMMs cannot take (dims not divisible by 16)."""
    if not cfg.float8_linear:
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def eligible(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or any(x in fqn for x in cfg.float8_exclude):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(cfg.float8_recipe),
                               module_filter_fn=eligible)
