"""Activation checkpointing modes: same loss, gradients and token counts as without them,
unchanged state-dict keys, less activation memory held, one-line config errors."""

import collections
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from torchmoe.config.errors import ConfigError
from torchmoe.config.registry import build_model
from torchmoe.config.schema import ActivationCheckpoint, Compile
from torchmoe.models.common.transformer import block_slots
from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.activation_checkpoint import (
    RECOMPUTE_MODULES,
    apply_ac,
    check_recompute_modules,
)
from torchmoe.parallel.compile import apply_compile

MODELS = {  # [model]/[moe] overrides of the debug flavors
    "dsv3": {"model.name": "deepseek_v3", "model.q_lora_rank": 0},
    "dsv3_q_lora": {"model.name": "deepseek_v3", "model.q_lora_rank": 32},
    "mixtral": {"model.name": "mixtral", "moe.shared_expert_intermediate_size": 0},
}
LACKS = {"mixtral": {"mla_up_proj", "mlp"}}  # GQA, and no shared experts
MODES = {  # id -> (mode, every_n_layers, recompute_modules)
    "full": ("full", 1, []),
    "full_every_2": ("full", 2, []),
    "op": ("selective", 1, []),
    "op_every_2": ("selective", 2, []),
    **{name: ("selective", 1, [name]) for name in RECOMPUTE_MODULES},
    "all_modules": ("selective", 1, list(RECOMPUTE_MODULES)),
}


def supported(model: str, mode: str) -> bool:
    return mode not in LACKS.get(model, ())


def build(tiny_config, model: str, **overrides) -> tuple[torch.nn.Module, object]:
    """A float32 debug model (3 blocks; DeepSeek's first is dense) with a random expert bias."""
    cfg = tiny_config(**MODELS[model], **{"training.seq_len": 16, **overrides})
    with torch.device("meta"):
        net = build_model(cfg)
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=torch.device("cpu"))
    for moe in moe_layers(net):
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(torch.randn_like(moe.router.expert_bias) * 0.1)
    return net, cfg


def moe_layers(net: torch.nn.Module) -> list[MoE]:
    return [m for m in net.modules() if isinstance(m, MoE)]


def with_ac(net: torch.nn.Module, mode: str, model: str = "") -> torch.nn.Module:
    """A copy of ``net`` (same weights) under ``MODES[mode]``; "all_modules" means those that
    ``model`` has."""
    mode, every, modules = MODES[mode]
    modules = [m for m in modules if m not in LACKS.get(model, ())]
    ac = copy.deepcopy(net)
    apply_ac(ac, ActivationCheckpoint(mode=mode, every_n_layers=every, recompute_modules=modules))
    return ac


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4224, (2, 17), generator=g)  # 16 inputs + shifted labels


def loss_of(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = net(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace("._checkpoint_wrapped_module", ""): p.grad
        for name, p in net.named_parameters()
    }


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", list(MODES))
def test_same_loss_gradients_and_token_counts(tiny_config, model, mode):
    if not supported(model, mode):
        pytest.skip(f"{model} has no {mode}")
    net, cfg = build(tiny_config, model)
    ac = with_ac(net, mode, model)
    batch = tokens()
    ref, got = loss_of(net, batch), loss_of(ac, batch)
    ref.backward()
    got.backward()
    assert torch.equal(got, ref)
    ref_grads, got_grads = grads(net), grads(ac)
    assert ref_grads.keys() == got_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    # counted once per forward, not again while backward recomputes
    topk = cfg.moe.router_topk
    for a, b in zip(moe_layers(net), moe_layers(ac), strict=True):
        assert torch.equal(b.tokens_per_expert, a.tokens_per_expert)
        assert b.tokens_per_expert.sum().item() == batch[:, :-1].numel() * topk
        assert torch.equal(b.stats, a.stats)


@pytest.mark.parametrize("mode", ["op", "moe_act", "all_modules"])
def test_grouped_mm_experts(tiny_config, mode):
    """The grouped-GEMM path (saved by the op policy, its activation a checkpointed method)."""
    net, _ = build(tiny_config, "dsv3_q_lora", **{"moe.grouped_mm": "grouped_mm"})
    ac = with_ac(net, mode)
    batch = tokens()
    ref, got = loss_of(net, batch), loss_of(ac, batch)
    ref.backward()
    got.backward()
    assert torch.equal(got, ref)
    for name, g in grads(net).items():
        torch.testing.assert_close(grads(ac)[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("model", list(MODELS))
def test_parameter_names_do_not_change(tiny_config, model):
    net, _ = build(tiny_config, model)
    for mode in MODES:
        if supported(model, mode):
            ac = with_ac(net, mode, model)
            assert list(ac.state_dict()) == list(net.state_dict()), mode
            ac.load_state_dict(net.state_dict())  # and a plain checkpoint loads back


def test_every_n_layers_chooses_positions_0_n_2n(tiny_config):
    net, _ = build(tiny_config, "mixtral", **{"model.n_layers": 5})
    ac = with_ac(net, "full_every_2")
    wrapped = [type(b).__name__ == "CheckpointWrapper" for b in ac.layers.values()]
    assert wrapped == [True, False, True, False, True]
    apply_ac(
        net, ActivationCheckpoint(mode="selective", every_n_layers=3, recompute_modules=["moe"])
    )
    patched = ["forward" in vars(b.feed_forward) for b in net.layers.values()]
    assert patched == [True, False, False, True, False]


def checkpointed_parts(net: torch.nn.Module) -> set[tuple[str, str]]:
    """(module name, method name) of every method or forward that apply_ac replaced."""
    return {
        (fqn, attr)
        for fqn, m in net.named_modules()
        for attr, value in vars(m).items()
        if isinstance(value, functools.partial) and value.func is checkpoint
    }


def test_module_recompute_keeps_module_types(tiny_config):
    """Plans find MoE layers by type (FSDP, dry run); module-level recompute keeps it."""
    net, _ = build(tiny_config, "dsv3_q_lora")
    ac = with_ac(net, "all_modules")
    assert [type(b.feed_forward).__name__ for b in ac.layers.values()] == [
        "FeedForward",
        "MoE",
        "MoE",
    ]
    # moe covers its shared experts and activation, mla_up_proj covers MLA's norms
    assert {part for part in checkpointed_parts(ac) if part[0].startswith("layers.1.")} == {
        ("layers.1.attention_norm", "forward"),
        ("layers.1.ffn_norm", "forward"),
        ("layers.1.attention", "up_project"),
        ("layers.1.attention", "core_attention"),
        ("layers.1.feed_forward", "forward"),
    }


def count_calls(monkeypatch, net: torch.nn.Module, names: list[str]) -> collections.Counter:
    """Patches, on their classes, the methods that ``names`` wrap (before apply_ac binds them),
    to count calls per module (by id)."""
    calls = collections.Counter()
    classes = {type(m) for m in net.modules()}
    for name in names:
        cls, method = RECOMPUTE_MODULES[name]
        for kind in {k for k in classes if issubclass(k, cls)}:
            original = getattr(kind, method or "forward")

            def counted(self, *args, _original=original, **kwargs):
                calls[id(self)] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(kind, method or "forward", counted)
    return calls


@pytest.mark.parametrize(
    "model,mode",
    [("dsv3_q_lora", m) for m in [*RECOMPUTE_MODULES, "all_modules"]]
    + [("mixtral", m) for m in ["core_attn", "layernorm", "all_modules"]],
)
def test_backward_reruns_each_named_part_once(tiny_config, monkeypatch, model, mode):
    """Each name wraps what it names: backward reruns every part it selects inside the blocks
    exactly once, and nothing outside them (a part covered by another, e.g. MLA's q_norm under
    mla_up_proj with layernorm, is not checkpointed twice, which would rerun it twice)."""
    net, _ = build(tiny_config, model, **{"model.mtp_num_layers": 1})
    names = [n for n in MODES[mode][2] if n not in LACKS.get(model, ())]
    calls = count_calls(monkeypatch, net, names)
    ac = with_ac(net, mode, model)
    batch = tokens()
    runs = []
    for m in (net, ac):
        calls.clear()
        loss_of(m, batch).backward()
        fqns = {id(module): fqn for fqn, module in m.named_modules()}
        blocks = tuple(f"{fqns[id(parent)]}.{name}." for parent, name in block_slots(m))
        runs.append(
            {
                fqn: (calls[id(module)], fqn.startswith(blocks))
                for fqn, module in m.named_modules()
                if calls[id(module)]
            }
        )
    plain, rerun = runs
    assert plain.keys() == rerun.keys()
    assert any(in_block for _, in_block in plain.values()), f"{mode} selects nothing"
    for fqn, (n, in_block) in plain.items():
        assert rerun[fqn][0] == (2 * n if in_block else n), fqn


class _LiveStorages(TorchDispatchMode):
    """Remembers every storage an op creates, to count afterwards the bytes still alive."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.seen[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.seen.values() if not ref.expired())


def activation_bytes(net: torch.nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the tensors forward leaves alive for backward (saved tensors, checkpoint
    inputs, selectively cached outputs), logits and loss included."""
    with _LiveStorages() as live:
        loss = loss_of(net, batch)
    held = live.live_bytes()
    loss.backward()
    return held


@pytest.mark.parametrize("model", list(MODELS))
def test_checkpointing_holds_fewer_activations(tiny_config, model):
    net, _ = build(tiny_config, model)
    batch = tokens()
    held = {
        mode: activation_bytes(with_ac(net, mode, model), batch)
        for mode in MODES
        if supported(model, mode)
    }
    none = activation_bytes(net, batch)
    assert held["full"] < held["op"] < none
    assert held["full"] < held["full_every_2"] < none
    for mode, n in held.items():
        assert n < none, mode


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            {
                "activation_checkpoint.mode": "selective",
                "activation_checkpoint.recompute_modules": "moe,attn",
            },
            "recompute_modules = ['moe', 'attn']: unknown module 'attn'; choose from core_attn, "
            "mla_up_proj, layernorm, mlp, moe, moe_act",
        ),
        (
            {
                "activation_checkpoint.mode": "full",
                "activation_checkpoint.recompute_modules": "moe",
            },
            "recompute_modules = ['moe'] needs activation_checkpoint.mode = 'selective', "
            "not 'full'",
        ),
        (
            {
                "activation_checkpoint.mode": "selective",
                "activation_checkpoint.recompute_modules": "mlp,mlp",
            },
            "recompute_modules = ['mlp', 'mlp'] lists 'mlp' twice",
        ),
        (
            {"activation_checkpoint.every_n_layers": 2},
            "every_n_layers = 2 has no effect with activation_checkpoint.mode = 'none'",
        ),
    ],
)
def test_bad_config_is_one_clear_line(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_module_the_model_lacks_is_one_clear_line(tiny_config):
    net, _ = build(tiny_config, "mixtral")
    with pytest.raises(
        ConfigError,
        match=r"^activation_checkpoint.recompute_modules = "
        r"\['mla_up_proj'\]: this model has no 'mla_up_proj' module",
    ) as err:
        check_recompute_modules(
            net, ActivationCheckpoint(mode="selective", recompute_modules=["mla_up_proj"])
        )
    assert "\n" not in str(err.value)


def _train_each_mode(rank: int, cfg_by_mode: dict) -> dict:
    from torchmoe.train.trainer import Trainer

    return {
        mode: Trainer(cfg, device=torch.device("cpu")).train() for mode, cfg in cfg_by_mode.items()
    }


def test_modes_under_fsdp_tensor_and_expert_parallelism(tiny_config, data_cache, monkeypatch):
    """FSDP2 x TP2 x EP2 on 4 gloo ranks trains as without checkpointing: the op policy meets
    DTensor redistributes and the all-to-all dispatcher; module recompute meets TP hooks and
    sharded FSDP units (the shared experts are one of their own)."""
    from tests.distributed.launcher import run_ranks
    from torchmoe.data.stdlib_docs import load_stdlib_docs

    load_stdlib_docs(data_cache)  # generate once, before ranks fork
    monkeypatch.setenv("WORLD_SIZE", "4")  # for config validation
    layout = {
        "parallelism.tp": 2,
        "parallelism.ep": 2,
        "model.q_lora_rank": 32,
        "training.steps": 2,
        "training.local_batch_size": 2,
        "moe.load_balancing_type": "none",
        "moe.aux_loss_coeff": 0.0,
    }
    not_moe = [m for m in RECOMPUTE_MODULES if m != "moe"]  # so mlp / moe_act apply
    modes = {
        "none": {},
        "full": {"activation_checkpoint.mode": "full"},
        "op": {"activation_checkpoint.mode": "selective"},
        "modules": {
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.recompute_modules": ",".join(not_moe),
        },
        "moe": {
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.recompute_modules": "moe",
        },
    }
    cfgs = {m: tiny_config(**layout, **extra) for m, extra in modes.items()}
    for losses in run_ranks(4, _train_each_mode, cfgs):
        for mode in modes:
            torch.testing.assert_close(losses[mode], losses["none"], rtol=1e-6, atol=1e-6)


@pytest.fixture
def fresh_dynamo():
    """Forgets the compiled frames afterwards: module-level recompute compiles the plain
    TransformerBlock.forward, and a later test compiling it at other shapes would recompile it
    with dynamic shapes, which inductor fails on for pad_to_capacity (test_compile.py)."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["full", "op", "all_modules"])
def test_composes_with_fullgraph_compile(tiny_config, fresh_dynamo, mode):
    """One MoE block, checkpointed and compiled whole (what the plan does with grouped-GEMM
    experts; module-level recompute compiles the block with its checkpointed methods inside):
    the region, buffer updates included, traces into one graph; same numbers and token counts as
    eager without checkpointing."""
    net, cfg = build(
        tiny_config,
        "dsv3",
        **{"model.n_layers": 1, "model.n_dense_layers": 0, "moe.grouped_mm": "grouped_mm"},
    )
    compiled = with_ac(net, mode)
    apply_compile(compiled, Compile(enable=True), fullgraph=True)  # a graph break would raise
    batch = tokens()
    for model in (net, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # _grouped_mm traces for bf16 only
            loss = loss_of(model, batch)
        loss.backward()
    got = {k.replace("._orig_mod", ""): g for k, g in grads(compiled).items()}
    for name, g in grads(net).items():
        torch.testing.assert_close(got[name], g, rtol=2e-2, atol=2e-4, msg=name)
    [ref_moe], [moe] = moe_layers(net), moe_layers(compiled)
    assert torch.equal(moe.tokens_per_expert, ref_moe.tokens_per_expert)
    assert moe.tokens_per_expert.sum().item() == batch[:, :-1].numel() * cfg.moe.router_topk


def test_the_config_check_knows_every_recompute_name():
    """config/parallel_checks.py refuses unknown names before anything is built; it must list
    exactly the names this module can recompute."""
    from torchmoe.config.parallel_checks import RECOMPUTE_MODULES as CHECKED

    assert tuple(RECOMPUTE_MODULES) == CHECKED
