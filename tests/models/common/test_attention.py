"""GQA's per-head q/k RMSNorm (Qwen3) against attention written out by hand."""

import math

import pytest
import torch

from torchmoe.models.common.attention import GQA, GQAArgs
from torchmoe.models.common.rope import RopeArgs, rope_cos_sin

B, S, D, H, G, K = 2, 10, 48, 6, 2, 8
EPS = 1e-6


def reference_attention(attn: GQA, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Projections, RMSNorm of each q/k head over its K channels (before RoPE), rotation of
    adjacent channel pairs, causal softmax attention with each key/value head serving
    H / G query heads, output projection."""

    def heads(t):
        return t.view(B, S, -1, K)

    def rms_norm(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * weight

    def rotate(t):
        cos, sin = cos_sin[None, :, None, :, 0], cos_sin[None, :, None, :, 1]
        even, odd = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    q = rotate(rms_norm(heads(x @ attn.wq.weight.T), attn.q_norm.weight))
    k = rotate(rms_norm(heads(x @ attn.wk.weight.T), attn.k_norm.weight))
    v = heads(x @ attn.wv.weight.T)
    k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("bshk,bthk->bhst", q, k) / math.sqrt(K)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhst,bthk->bshk", scores.softmax(-1), v)
    return out.flatten(2) @ attn.wo.weight.T


def make(qk_norm: bool) -> GQA:
    torch.manual_seed(0)
    attn = GQA(
        GQAArgs(
            dim=D,
            n_heads=H,
            n_kv_heads=G,
            head_dim=K,
            softmax_scale=K**-0.5,
            qk_norm=qk_norm,
            norm_eps=EPS,
        )
    )
    attn.init_weights(0.2, 0.2)
    return attn


def test_qk_norm_matches_a_hand_written_reference():
    attn = make(qk_norm=True)
    with torch.no_grad():  # non-uniform norm weights: normalising after RoPE would differ
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, S, D)
    cos_sin = rope_cos_sin(RopeArgs(head_dim=K, theta=1e4), S)
    torch.testing.assert_close(
        attn(x, cos_sin), reference_attention(attn, x, cos_sin), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_parameters_exist_only_when_asked_and_init_to_one(qk_norm):
    attn = make(qk_norm)
    names = {name for name, _ in attn.named_parameters()}
    assert ({"q_norm.weight", "k_norm.weight"} <= names) == qk_norm
    assert not qk_norm or (
        attn.q_norm.weight.shape == (K,) and torch.equal(attn.k_norm.weight, torch.ones(K))
    )
