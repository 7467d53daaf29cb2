"""The masks context parallelism attends with: a rank's queries (a head and a tail chunk) over
every key. Checked against the full sequence's causal / block-causal attention, whose rows at
the rank's positions they must reproduce (float64 SDPA as the reference)."""

import pytest
import torch
import torch.nn.functional as F

from torchmoe.models.common.attention import causal_attention
from torchmoe.models.common.document_mask import document_mask
from torchmoe.parallel.context_parallel import causal_mask, local_positions


def _full_attention_rows(q, k, v, allowed_SS, positions):
    """Rows ``positions`` of float64 attention over the whole sequence with mask [B?, S, S]."""
    out = F.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), attn_mask=allowed_SS
    ).transpose(1, 2)
    return out[:, positions]


@pytest.mark.parametrize("seq_len,cp", [(32, 2), (48, 3)])
def test_local_positions_cover_the_sequence_once_with_equal_causal_work(seq_len, cp):
    ranks = [local_positions(seq_len, cp, r, torch.device("cpu")) for r in range(cp)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(seq_len))
    work = [int((p + 1).sum()) for p in ranks]  # keys each rank's queries see
    assert len(set(work)) == 1


def test_document_mask_of_chunk_queries_is_the_full_masks_rows():
    g = torch.Generator().manual_seed(3)
    B, S, cp = 2, 24, 3
    doc = (torch.rand(B, S, generator=g) < 0.2).cumsum(1)
    full = document_mask(doc)
    for rank in range(cp):
        pos = local_positions(S, cp, rank, torch.device("cpu"))
        assert torch.equal(document_mask(doc, pos), full[:, :, pos])
    # a mask of the first positions is not the answer for a later chunk
    pos = local_positions(S, cp, 0, torch.device("cpu"))
    first = document_mask(doc, torch.arange(pos.numel()))
    assert not torch.equal(first, full[:, :, pos])


def _chunk_attention_matches_full_rows(
    device: torch.device, seq_len: int, cp: int, atol: float = 2e-5
) -> None:
    g = torch.Generator().manual_seed(5)
    B, H, Q, U = 2, 4, 32, 24  # U != Q: MLA's value dim
    q, k = (torch.randn(B, seq_len, H, Q, generator=g).to(device) for _ in range(2))
    v = torch.randn(B, seq_len, H, U, generator=g).to(device)
    doc = (torch.rand(B, seq_len, generator=g) < 0.05).cumsum(1).to(device)
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    for rank in range(cp):
        pos = local_positions(seq_len, cp, rank, device)
        q_local = q[:, pos]
        got = causal_attention(q_local, k, v, Q**-0.5, causal_mask(pos, seq_len))
        want = _full_attention_rows(q, k, v, causal_SS, pos)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)
        got = causal_attention(q_local, k, v, Q**-0.5, document_mask(doc, pos))
        docs_SS = (doc[:, :, None] == doc[:, None, :]) & causal_SS
        want = _full_attention_rows(q, k, v, docs_SS[:, None], pos)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)


def test_chunk_queries_attend_like_the_full_sequence_on_cpu():
    _chunk_attention_matches_full_rows(torch.device("cpu"), 48, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq_len,cp", [(1024, 2), (1000, 4)])  # 1000: partial flex blocks
def test_chunk_queries_attend_like_the_full_sequence_with_flex_on_gpu(seq_len, cp):
    _chunk_attention_matches_full_rows(torch.device("cuda"), seq_len, cp, atol=2e-4)
