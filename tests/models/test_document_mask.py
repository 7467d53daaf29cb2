"""Block-causal attention (model.attn_mask = "block_causal"): a packed row with document ids
gives each document the logits it gets alone (dense models, so no routing can flip), for MLA
and GQA; on a GPU the flex-attention kernel equals the dense-mask reference, compiled."""

import random

import pytest
import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.models.common.attention import causal_attention
from torchmoe.models.common.document_mask import document_mask

FAMILIES = ["deepseek_v3", "qwen3_moe"]  # MLA, GQA (2 query heads per key/value head)


def random_documents(rng: random.Random, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq] document ids: runs of random length (1 to seq / 2), one row a single
    document."""
    rows = []
    for b in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = seq if b == 0 else rng.randint(1, seq // 2)
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def dense_model(family: str, seq: int) -> torch.nn.Module:
    cfg = build_config(
        {},
        [
            ("model.name", family),
            ("model.dim", "64"),
            ("model.n_layers", "2"),
            ("model.n_heads", "4"),
            ("model.n_kv_heads", "2"),
            ("model.head_dim", "16"),
            ("moe.num_experts", "0"),
            ("training.seq_len", str(seq)),
        ],
    )
    model = build_model(cfg)
    model.init_weights(0.02, cfg.model.n_layers)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_document_gets_the_logits_it_gets_alone(family: str, rng: random.Random) -> None:
    torch.manual_seed(rng.randrange(2**31))
    seq = 48
    model = dense_model(family, seq)
    tokens = torch.randint(0, 4000, (3, seq))
    docs = random_documents(rng, 3, seq)
    with torch.no_grad():
        packed = model(tokens, document_ids=docs)
        causal = model(tokens)
        for b in range(3):
            for d in docs[b].unique():
                where = (docs[b] == d).nonzero().flatten()
                alone = model(tokens[b : b + 1, where])[0]
                torch.testing.assert_close(packed[b, where], alone, rtol=1e-4, atol=1e-5)
    # the single-document row is causal attention; rows with several documents are not
    torch.testing.assert_close(packed[0], causal[0])
    assert not torch.allclose(packed[1:], causal[1:], atol=1e-3)


def test_the_dense_mask_is_causal_within_documents_only() -> None:
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_mask(docs)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention runs on CUDA here")
@pytest.mark.parametrize(
    "heads, kv_heads, qk_dim, v_dim", [(16, 16, 192, 128), (8, 2, 128, 128)], ids=["mla", "gqa"]
)
def test_flex_attention_equals_the_dense_mask_on_gpu(
    heads: int, kv_heads: int, qk_dim: int, v_dim: int, rng: random.Random
) -> None:
    torch.manual_seed(rng.randrange(2**31))
    B, S = 2, 1024
    docs = random_documents(rng, B, S).cuda()
    q = torch.randn(B, S, heads, qk_dim, device="cuda", requires_grad=True)
    k = torch.randn(B, S, kv_heads, qk_dim, device="cuda", requires_grad=True)
    v = torch.randn(B, S, kv_heads, v_dim, device="cuda", requires_grad=True)
    dense = (docs[:, :, None] == docs[:, None, :]) & torch.ones(
        S, S, dtype=torch.bool, device="cuda"
    ).tril()
    results = []
    for mask in (document_mask(docs), dense[:, None]):  # flex BlockMask, then SDPA's mask
        out = causal_attention(q, k, v, qk_dim**-0.5, mask)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        results.append((out, *grads))
    for flex, reference in zip(*results):
        torch.testing.assert_close(flex, reference, rtol=2e-3, atol=2e-3)
