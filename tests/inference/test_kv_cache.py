"""Generation with the KV cache equals generation without it (the training forward rerun over
the whole prefix): the same greedy tokens and, step by step, the same logits, for MLA (direct
and low-rank queries; the cache holds the latent) and GQA, with prompts of different lengths
in one batch."""

import random

import pytest
import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.inference.generate import generate
from torchmoe.models.common.kv_cache import KVCache

VARIANTS = {
    "mla": {"model.name": "deepseek_v3"},
    "mla_q_lora": {"model.name": "deepseek_v3", "model.q_lora_rank": 32},
    "gqa": {"model.name": "qwen3_moe", "model.n_kv_heads": 2},
}


def random_model(overrides: dict) -> torch.nn.Module:
    values = {
        "model.dim": 64,
        "model.n_layers": 3,
        "model.n_heads": 4,
        "model.head_dim": 16,
        "moe.ffn_hidden_size": 32,
        "moe.shared_expert_intermediate_size": 32,
        "training.seq_len": 64,
        **overrides,
    }
    cfg = build_config({}, [(k, str(v)) for k, v in values.items()])
    cfg.moe.eval_capacity_factor = 0.0  # dropless, as scripts/generate.py builds it
    model = build_model(cfg)
    model.init_weights(0.1, cfg.model.n_layers)  # larger weights: sharper, varied logits
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_the_full_forward(variant: str, rng: random.Random) -> None:
    torch.manual_seed(rng.randrange(2**31))
    model = random_model(VARIANTS[variant])
    tokens = torch.randint(0, 4000, (3, 20))
    lengths = torch.tensor([9, 14, 5])  # prompts, right-padded; then one token a step
    cache = KVCache(len(model.layers), 20)
    with torch.no_grad():
        full = model(tokens)
        width = int(lengths.max())
        prefill = model(tokens[:, :width], cache=cache.at(torch.arange(width).expand(3, width)))
        for b in range(3):  # each prompt's own positions are exact despite the padding
            n = int(lengths[b])
            torch.testing.assert_close(prefill[b, :n], full[b, :n], rtol=1e-4, atol=1e-5)
        rows = torch.arange(3)
        while int(lengths.max()) < 20:
            nxt = tokens[rows, lengths]  # the row's next position, whatever the others do
            step = model(nxt[:, None], cache=cache.at(lengths[:, None]))[:, 0]
            torch.testing.assert_close(step, full[rows, lengths], rtol=1e-4, atol=1e-5)
            lengths = (lengths + 1).clamp(max=19)
            if bool((lengths == 19).all()):
                break


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_generation_equals_the_uncached(variant: str, rng: random.Random) -> None:
    torch.manual_seed(rng.randrange(2**31))
    model = random_model(VARIANTS[variant])
    prompts = [[rng.randrange(4000) for _ in range(n)] for n in (7, 1, 12, 4)]
    never = model.output.weight.shape[0]  # a stop id past the vocabulary: no row stops early
    args = (model, prompts, 16, {never})
    cached, uncached = generate(*args, kv_cache=True), generate(*args, kv_cache=False)
    assert cached == uncached
    assert all(len(out) == 16 for out in cached)  # no stop token: every row ran to the end
    assert len({tuple(out) for out in cached}) > 1


def test_a_position_past_the_cache_is_an_error() -> None:
    with pytest.raises(ValueError, match="past the cache"):
        KVCache(2, 8).at(torch.tensor([[3], [8]]))
