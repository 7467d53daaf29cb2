"""Block-quantized fp8 checkpoints (DeepSeek-V3's release): each quantized weight W is stored as
e4m3 values Q with one float32 scale per block of ``weight_block_size`` (128 x 128) in
``<name>_scale_inv``, W = Q x scale. Dequantized on import to float32, so training starts from
the released values exactly (the model's dtype takes over from there)."""

from collections.abc import Mapping

import torch

from torchmoe.config.errors import ConfigError

SCALE_SUFFIX = "_scale_inv"


def block_size(hf: dict) -> tuple[int, int] | None:
    """The fp8 block shape config.json's quantization_config declares, None without one; a
    quantization this importer cannot undo is one line."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "?")
    block = q.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ConfigError(
            f"config.json: quantization_config ({method}) describes weights this importer "
            "cannot dequantize (it reads block-scaled fp8, as DeepSeek-V3 ships); convert them "
            "to bfloat16 or float32 first"
        )
    return int(block[0]), int(block[1])


def check_scales(tensors: Mapping[str, torch.Tensor], block: tuple[int, int]) -> None:
    """Every ``<w>_scale_inv`` scales a 2-D ``<w>`` of the folder with one scale per block
    (meta tensors will do: an import checks before it reads)."""
    for name, scale in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        weight_name = name.removesuffix(SCALE_SUFFIX)
        weight = tensors.get(weight_name)
        if weight is None or weight.dim() != 2:
            raise ConfigError(f"{name}: scales a tensor {weight_name} that is missing or not 2-D")
        rows, cols = weight.shape
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        if tuple(scale.shape) != grid:
            raise ConfigError(
                f"{name} has shape {list(scale.shape)}; a {rows}x{cols} weight in "
                f"{block[0]}x{block[1]} blocks needs {list(grid)}"
            )


def dequantize(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``<w>`` that has a ``<w>_scale_inv`` dequantized to float32 and
    the scales dropped; other tensors unchanged."""
    check_scales(tensors, block)
    out = {k: t for k, t in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    for name, scale in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            weight_name = name.removesuffix(SCALE_SUFFIX)
            out[weight_name] = dequantize_one(tensors[weight_name], scale, block)
    return out


def dequantize_one(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """W = Q x scale, float32, for one weight whose scales ``check_scales`` accepted."""
    rows, cols = weight.shape
    full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * full[:rows, :cols]
