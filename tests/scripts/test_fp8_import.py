"""DeepSeek-V3's fp8 release layout (e4m3 weights, one float32 scale per block in
<name>_scale_inv, quantization_config with weight_block_size) dequantizes on import to exactly
Q x scale, checked against a float64 loop; the imported model then computes what transformers
computes from the same dequantized weights."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.models.test_hf_parity import assert_same_logits, tiny_hf, torchmoe_from_hf
from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf.fp8 import dequantize
from torchmoe.train.checkpoint import read_model_weights

E4M3_MAX = 448.0


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block fp8 as DeepSeek's quantizer lays it out: Q e4m3, scale = amax / 448 per block."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    scale = torch.empty(grid)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            s = part.abs().max().clamp_min(1e-12) / E4M3_MAX
            scale[i, j] = s
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (part / s).to(
                torch.float8_e4m3fn
            )
    return q, scale


def loop_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = q[r, c].double() * scale[r // block[0], c // block[1]].double()
    return out


def test_dequantize_equals_the_loop_reference():
    torch.manual_seed(0)
    block = (16, 8)
    w = torch.randn(37, 21)  # partial blocks on both edges
    q, scale = quantize(w, block)
    got = dequantize({"a.weight": q, "a.weight_scale_inv": scale, "b": w}, block)
    assert set(got) == {"a.weight", "b"} and got["a.weight"].dtype == torch.float32
    torch.testing.assert_close(got["a.weight"].double(), loop_dequantize(q, scale, block))
    with pytest.raises(
        ConfigError,
        match=r"a.weight_scale_inv has shape \[3, 2\]; "
        r"a 37x21 weight in 16x8 blocks needs \[3, 3\]",
    ):
        dequantize({"a.weight": q, "a.weight_scale_inv": scale[:, :2]}, block)


def fp8_release(tmp_path: Path, tied: bool = False) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 as its fp8 release lays it out (projections in e4m3 with block
    scales; with ``tied``, also the embedding, and no lm_head) and the same model's dequantized
    weights in bfloat16's place (``bf``, float32), for transformers."""
    hf = tiny_hf("deepseek_v3")
    if tied:
        hf.config.tie_word_embeddings = True
    hf.save_pretrained(tmp_path / "bf")
    block = (16, 16)
    tensors, quantized = load_file(tmp_path / "bf" / "model.safetensors"), {}
    for name, t in tensors.items():
        linear = name.endswith("proj.weight") and t.dim() == 2 and "embed" not in name
        if linear or (tied and name == "model.embed_tokens.weight"):  # as the release
            q, scale = quantize(t, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            t.copy_(loop_dequantize(q, scale, block).float())  # what the model should hold
        elif name != "lm_head.weight" or not tied:
            quantized[name] = t
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    save_file(quantized, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    assert any(t.dtype == torch.float8_e4m3fn for t in quantized.values())
    save_file(tensors, tmp_path / "bf" / "model.safetensors", metadata={"format": "pt"})
    return fp8, tmp_path / "bf"


def test_an_fp8_release_imports_to_its_dequantized_values(tmp_path: Path):
    fp8, bf = fp8_release(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(  # the dequantized weights
        bf, attn_implementation="eager", dtype=torch.float32
    )
    _, ours = torchmoe_from_hf(fp8)
    assert_same_logits(ours, reference.eval(), reference.config.vocab_size)


def test_a_tied_fp8_embedding_is_also_the_dequantized_output_head(tmp_path: Path, script):
    """The output head is read under the embedding's name, and so are its scales."""
    fp8, bf = fp8_release(tmp_path, tied=True)
    assert (
        script("convert_hf").main(["import", "--hf", str(fp8), "--out", str(tmp_path / "c")]) == 0
    )
    weights = read_model_weights(tmp_path / "c" / "step-0", "--checkpoint")
    embedding = load_file(bf / "model.safetensors")["model.embed_tokens.weight"]
    assert embedding.abs().max() > 0.01  # quantized and dequantized, not zero
    for name in ("tok_embeddings.weight", "output.weight"):
        torch.testing.assert_close(weights[name], embedding, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_scale", "_scale_inv has shape [1, 1]; a "),
        ("orphan_scale", "scales a tensor model.stray.weight that is missing or not 2-D"),
    ],
)
def test_a_bad_scale_is_one_line_before_anything_is_written(
    tmp_path: Path, script, capsys, case: str, message: str
):
    fp8, _ = fp8_release(tmp_path)
    tensors = load_file(fp8 / "model.safetensors")
    scale = next(k for k in tensors if k.endswith("_scale_inv") and tensors[k].shape[0] > 1)
    if case == "bad_scale":
        tensors[scale] = tensors[scale][:1, :1].clone()
    else:
        tensors["model.stray.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert (
        script("convert_hf").main(["import", "--hf", str(fp8), "--out", str(tmp_path / "c")]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c" / "step-0").exists()


def test_other_quantizations_are_one_line(tmp_path: Path):
    tiny_hf("deepseek_v3").save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quantization_config \(awq\) describes weights this"):
        torchmoe_from_hf(tmp_path / "q")
