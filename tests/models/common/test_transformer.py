"""The decoder's multi-token prediction: its loss against DeepSeek-V3's formulation written out
from the module's pieces, its gradients, the loss-sum buffer, init and config checks."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.validate import validate
from torchmoe.models.moe.balance import set_aux_loss_scale

B, S, DEPTH, SCALE = 2, 12, 2, 0.3


def config(**overrides):
    values = {
        "model.dim": 64,
        "model.inter_dim": 96,
        "moe.ffn_hidden_size": 32,
        "moe.shared_expert_intermediate_size": 32,
        "model.n_layers": 2,
        "training.seq_len": S,
        "model.mtp_num_layers": DEPTH,
        "model.mtp_loss_scale": SCALE,
        "moe.router_dtype": "fp64",
        # balance losses off: the filled positions past the end reach the MTP block's
        # router (a semantic difference from the truncated reference, by design)
        "moe.load_balancing_type": "none",
        "moe.aux_loss_coeff": 0,
        **overrides,
    }
    cfg = build_config({}, [(k, str(v)) for k, v in values.items()])
    validate(cfg)
    return cfg


def materialise(cfg, seed=0, dtype=torch.float64):
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=torch.device("cpu"))
    return model.to(dtype)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 4000, (B, S + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def reference_mtp_loss(model, tokens, labels):
    """DeepSeek-V3's formulation: depth k runs on the n = S - k positions whose target
    (token t + k + 1) is inside the sequence; it reads [enorm(Emb(t + k)); hnorm(h_{k-1})]."""
    cos_sin = model.rope_cos_sin
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, cos_sin[:S])
    losses = []
    for k, mtp in enumerate(model.mtp, start=1):
        n = S - k
        emb = model.tok_embeddings(labels[:, k - 1 : k - 1 + n])
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h[:, :n])], dim=-1))
        h = mtp.block(x, cos_sin[:n])
        logits = model.output(mtp.norm(h))
        losses.append(F.cross_entropy(logits.flatten(0, 1), labels[:, k : k + n].flatten()))
    return SCALE * sum(losses) / len(losses)


def test_module_names_and_the_mtp_block_follows_the_last_block():
    model = materialise(config())
    names = {n for n, _ in model.named_parameters() if n.startswith("mtp.")}
    for k in range(DEPTH):
        assert {f"mtp.{k}.{m}.weight" for m in ("enorm", "hnorm", "eh_proj", "norm")} <= names
        assert f"mtp.{k}.block.feed_forward.router.gate.weight" in names  # last block is MoE
    assert model.mtp[0].eh_proj.weight.shape == (64, 128)
    dense_last = materialise(config(**{"model.n_layers": 3, "moe.layer_freq": "1,1,0"}))
    assert type(dense_last.mtp[0].block.feed_forward).__name__ == "FeedForward"


def test_attached_loss_and_its_gradients_equal_the_reference():
    model = materialise(config())
    tokens, labels = batch()
    out = model(tokens, labels)
    torch.testing.assert_close(out, model(tokens), rtol=0, atol=0)  # logits unchanged
    ref = reference_mtp_loss(model, tokens, labels)
    model.mtp.loss_sum.zero_()

    out = model(tokens, labels)
    torch.testing.assert_close(model.mtp.loss_sum, ref.detach(), rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    (0.0 * out).sum().backward()  # only the attached MTP loss sends gradients
    expected = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, p), g in zip(model.named_parameters(), expected):
        want = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(p.grad, want, rtol=1e-8, atol=1e-12, msg=name)


def test_gradient_reaches_mtp_and_main_model_at_the_loss_scale():
    model = materialise(config())
    tokens, labels = batch(seed=2)

    def grads(scale):
        model.zero_grad()
        set_aux_loss_scale(scale)
        try:
            (0.0 * model(tokens, labels)).sum().backward()
        finally:
            set_aux_loss_scale(1.0)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, quarter = grads(1.0), grads(0.25)
    for prefix in (
        "mtp.0.eh_proj",
        "mtp.1.eh_proj",
        "mtp.1.block.attention",
        "mtp.0.norm",
        "layers.0.attention",
        "layers.1.feed_forward",
        "tok_embeddings",
        "output",
    ):
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in full.items()), prefix
    for name, g in full.items():
        torch.testing.assert_close(quarter[name], 0.25 * g, rtol=1e-9, atol=1e-14, msg=name)
    assert not full["norm.weight"].any()  # the final norm sees only the main loss


def test_loss_sum_accumulates_once_per_forward_even_under_checkpoint_recompute():
    model = materialise(config())
    tokens, labels = batch(seed=3)
    model(tokens)  # no labels: no MTP loss
    assert model.mtp.loss_sum.item() == 0
    model(tokens, labels)
    once = model.mtp.loss_sum.clone()
    model(tokens, labels)
    torch.testing.assert_close(model.mtp.loss_sum, 2 * once)
    model.mtp.loss_sum.zero_()
    out = checkpoint(model, tokens, labels, use_reentrant=False)
    out.sum().backward()  # recomputes the forward, MTP included
    torch.testing.assert_close(model.mtp.loss_sum, once)


def test_init_covers_mtp_and_leaves_the_main_model_as_without_mtp():
    with_mtp = materialise(config(), dtype=torch.float32)
    without = materialise(config(**{"model.mtp_num_layers": 0}), dtype=torch.float32)
    assert without.mtp is None
    for name, p in without.state_dict().items():
        assert torch.equal(p, with_mtp.state_dict()[name]), name
    for name, p in with_mtp.mtp.named_parameters():
        assert torch.isfinite(p).all(), name
    assert torch.equal(with_mtp.mtp[1].hnorm.weight, torch.ones(64))
    assert with_mtp.mtp[0].eh_proj.weight.std() > 0


def test_depth_must_leave_a_target_in_the_sequence():
    with pytest.raises(
        ConfigError,
        match=r"model.mtp_num_layers = 12 leaves no token to "
        r"predict within training.seq_len = 12",
    ):
        config(**{"model.mtp_num_layers": 12})
