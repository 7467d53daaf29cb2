"""Activation offloading (``activation_checkpoint.offload_modules``): the offloaded parts save
their tensors through the offloader and give the same loss, gradients and token counts as the
plain model (on CPU the "host copy" is a copy in host memory), alone, beside module recompute
and under compile; parameters and small tensors stay; bad combinations are one line. On a GPU:
the saved tensors leave GPU memory and come back exactly."""

import functools

import pytest
import torch

from tests.parallel.test_activation_checkpoint import (
    LACKS,
    build,
    fresh_dynamo,  # noqa: F401 (fixture)
    grads,
    loss_of,
    moe_layers,
    tokens,
)
from torchmoe.config.errors import ConfigError
from torchmoe.config.parallel_checks import RECOMPUTE_MODULES
from torchmoe.config.schema import ActivationCheckpoint, Compile
from torchmoe.parallel import activation_offload
from torchmoe.parallel.activation_checkpoint import apply_ac, check_recompute_modules
from torchmoe.parallel.activation_offload import ActivationOffloader, apply_offload
from torchmoe.parallel.compile import apply_compile
from torchmoe.train import trainer as trainer_module


@pytest.fixture
def small_tensors_too(monkeypatch):
    """The debug models' activations are far below MIN_BYTES: offload everything."""
    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)


def _offloaded(net, offload: list[str], recompute: list[str] = ()) -> ActivationOffloader:
    cfg = ActivationCheckpoint(
        mode="selective" if recompute else "none",
        recompute_modules=list(recompute),
        offload_modules=offload,
    )
    apply_ac(net, cfg)
    return apply_offload(net, cfg)


def _assert_same_training(net, ref, batch, rtol=0.0, atol=0.0):
    got, want = loss_of(net, batch), loss_of(ref, batch)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    ref_grads = grads(ref)
    for name, g in grads(net).items():
        torch.testing.assert_close(
            g, ref_grads[name.replace("._orig_mod", "")], rtol=rtol, atol=atol, msg=name
        )
    for a, b in zip(moe_layers(ref), moe_layers(net), strict=True):
        assert torch.equal(b.tokens_per_expert, a.tokens_per_expert)


OFFLOADS = {**{name: [name] for name in RECOMPUTE_MODULES}, "all": list(RECOMPUTE_MODULES)}


@pytest.mark.parametrize("model", ["dsv3", "mixtral"])
@pytest.mark.parametrize("which", list(OFFLOADS))
def test_offloaded_parts_train_exactly_as_the_plain_model(
    tiny_config, small_tensors_too, model, which
):
    names = [n for n in OFFLOADS[which] if n not in LACKS.get(model, ())]
    if not names:
        pytest.skip(f"{model} has no {which}")
    ref, _ = build(tiny_config, model)
    net, _ = build(tiny_config, model)
    offloader = _offloaded(net, names)
    _assert_same_training(net, ref, tokens())
    assert offloader.offloaded_bytes > 0


def test_offloading_beside_module_recompute(tiny_config, small_tensors_too):
    ref, _ = build(tiny_config, "dsv3")
    net, _ = build(tiny_config, "dsv3")
    offloader = _offloaded(net, ["moe_act", "layernorm"], recompute=["core_attn", "mlp"])
    _assert_same_training(net, ref, tokens())
    assert offloader.offloaded_bytes > 0


def test_offloaded_parts_run_eagerly_inside_compiled_blocks(
    tiny_config,
    small_tensors_too,
    fresh_dynamo,  # noqa: F811
):
    overrides = {"model.n_layers": 1, "model.n_dense_layers": 0, "moe.grouped_mm": "grouped_mm"}
    ref, _ = build(tiny_config, "dsv3", **overrides)
    net, _ = build(tiny_config, "dsv3", **overrides)
    offloader = _offloaded(net, ["moe_act", "core_attn"])
    apply_compile(net, Compile(enable=True), fullgraph=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # _grouped_mm traces for bf16 only
        _assert_same_training(net, ref, tokens(), rtol=2e-2, atol=2e-4)
    assert offloader.offloaded_bytes > 0


def test_the_trainer_offloads_and_trains_as_without(tiny_config, small_tensors_too):
    Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
    plain = Trainer(tiny_config())
    offload = Trainer(tiny_config(**{"activation_checkpoint.offload_modules": "moe_act,mlp"}))
    assert [plain.train_step().loss for _ in range(3)] == [
        offload.train_step().loss for _ in range(3)
    ]


def test_weights_their_views_and_small_tensors_stay_a_shared_input_goes_once():
    offloader = ActivationOffloader()
    torch.manual_seed(0)
    part = torch.nn.ModuleList(torch.nn.Linear(600, 600, bias=False) for _ in range(2))
    part.stack = torch.nn.Parameter(torch.randn(2, 600, 600))
    small = torch.randn(10, requires_grad=True)
    big = torch.randn(600, 600, requires_grad=True)  # 1.4 MB, over MIN_BYTES
    with offloader.offloading(part):
        # each linear saves its input and weight.t(), a view of its weight; the last matmul
        # saves stack[1], a contiguous view of a weight
        out = part[0](big).sum() + part[1](big).sum() + (small * small).sum()
        out = out + (big @ part.stack[1]).sum()
    assert offloader.offloaded_bytes == big.numel() * 4  # big, once
    out.backward()
    ones = torch.ones(600, 600)
    for linear in part:
        torch.testing.assert_close(linear.weight.grad, ones.t() @ big.detach())
    torch.testing.assert_close(part.stack.grad[1], big.detach().t() @ ones)
    w = (part[0].weight + part[1].weight).detach()
    torch.testing.assert_close(big.grad, ones @ w + ones @ part.stack[1].detach().t())
    torch.testing.assert_close(small.grad, 2 * small.detach())


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"activation_checkpoint.offload_modules": "attn"}, "unknown module 'attn'"),
        ({"activation_checkpoint.offload_modules": "mlp,mlp"}, "lists 'mlp' twice"),
        (
            {"activation_checkpoint.mode": "full", "activation_checkpoint.offload_modules": "mlp"},
            "needs mode = 'none' or module recompute (recompute_modules), not full",
        ),
        (
            {
                "activation_checkpoint.mode": "selective",
                "activation_checkpoint.offload_modules": "mlp",
            },
            "not selective with the op-level policy",
        ),
        (
            {
                "activation_checkpoint.mode": "selective",
                "activation_checkpoint.recompute_modules": "moe",
                "activation_checkpoint.offload_modules": "moe_act",
            },
            "lists 'moe_act' and recompute_modules 'moe': one runs inside the other",
        ),
        (
            {
                "activation_checkpoint.mode": "selective",
                "activation_checkpoint.recompute_modules": "layernorm",
                "activation_checkpoint.offload_modules": "layernorm",
            },
            "lists 'layernorm' and recompute_modules 'layernorm'",
        ),
    ],
)
def test_bad_offload_settings_are_one_line(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_an_offload_module_the_model_lacks_is_one_line(tiny_config):
    net, _ = build(tiny_config, "mixtral")
    with pytest.raises(ConfigError, match=r"offload_modules = \['mla_up_proj'\]: this model has"):
        check_recompute_modules(net, ActivationCheckpoint(offload_modules=["mla_up_proj"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_saved_tensors_leave_memory_and_come_back_exactly():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024, device="cuda") for _ in range(4)]
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)

    def forward(offloader):
        h = x * 1.0  # x itself stays alive in the test: offload only what forward makes
        for layer in layers:
            if offloader is None:
                h = torch.nn.functional.gelu(layer(h))
            else:
                with offloader.offloading(layer):
                    h = torch.nn.functional.gelu(layer(h))
        return h

    def run(offloader):
        for p in [x, *(p for layer in layers for p in layer.parameters())]:
            p.grad = None
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = forward(offloader)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator frees blocks whose copies are done
        held = torch.cuda.memory_allocated() - start
        out.square().sum().backward()
        return held, [x.grad.clone()] + [layer.weight.grad.clone() for layer in layers]

    plain_held, plain_grads = run(None)
    offloader = ActivationOffloader()
    held, got = run(offloader)
    assert offloader.offloaded_bytes > 0
    assert held < plain_held - 0.9 * offloader.offloaded_bytes, (held, plain_held)
    for a, b in zip(got, plain_grads, strict=True):
        assert torch.equal(a, b)
