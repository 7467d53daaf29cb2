"""Frozen routers and experts do not move over several AdamW steps with weight decay (which
moves every weight it sees), in one process and under FSDP2, EP2, expert TP2 and FSDP2 x EP2 on
gloo ranks; every other expert and weight does move. The loop is the trainer's: backward, zero
the frozen gradient rows, clip, step, restore."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.distributed.launcher import run_ranks
from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.schema import JobConfig
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.grad_norm import clip_grad_norm_
from torchmoe.parallel.plans import parallelize
from torchmoe.train.freeze import ExpertFreezer, freeze_routers
from torchmoe.train.optim import build_optimizer

STEPS, SEQ, VOCAB = 3, 16, 101
FROZEN = [1, 6]  # one in each half of the experts: both ep ranks hold one
LAYOUTS = {
    "single": (1, {}),
    "fsdp2": (2, {}),
    "ep2": (2, {"parallelism.ep": 2}),
    "etp2": (2, {"parallelism.etp": 2}),
    "fsdp2_x_ep2": (4, {"parallelism.ep": 2, "parallelism.dp_shard": 2}),
}


def config(**overrides) -> JobConfig:
    values = {
        "model.dim": 32,
        "model.inter_dim": 64,
        "model.n_heads": 2,
        "model.kv_lora_rank": 16,
        "model.qk_nope_head_dim": 8,
        "model.qk_rope_head_dim": 8,
        "model.v_head_dim": 8,
        "model.vocab_size": VOCAB,
        "moe.ffn_hidden_size": 16,
        "moe.shared_expert_intermediate_size": 16,
        "optimizer.weight_decay": 0.1,
        "optimizer.lr": 1e-2,
        "training.seq_len": SEQ,
        "moe.freeze_router": "true",
        "moe.freeze_experts": ",".join(map(str, FROZEN)),
        **overrides,
    }
    return build_config({}, [(k, str(v)) for k, v in values.items()])


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train_frozen(rank: int, cfg: JobConfig, seed: int):
    """STEPS optimizer steps with the freezer; returns the parameters before and after, and
    per expert weight the frozen rows' gradient mass before and after ``zero_grads``."""
    world = dist.get_world_size()
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.build_meshes("cpu")
    with torch.device("meta"):
        model = build_model(cfg)
    freeze_routers(model)
    model = parallelize(model, dims, cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    freezer = ExpertFreezer(model, cfg.moe.freeze_experts)
    before = {name: full(p) for name, p in model.named_parameters()}
    frozen_grads = {"before": 0.0, "after": 0.0}
    data = torch.Generator().manual_seed(seed + 1 + dims.dp_rank())
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=data)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        frozen_grads["before"] += frozen_grad_mass(model)
        freezer.zero_grads()
        frozen_grads["after"] += frozen_grad_mass(model)
        clip_grad_norm_(list(model.parameters()), 0.5)
        optimizer.step()
        freezer.restore()
        optimizer.zero_grad(set_to_none=True)
    after = {name: full(p) for name, p in model.named_parameters()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    return before, after, frozen_grads, requires_grad


def frozen_grad_mass(model: torch.nn.Module) -> float:
    return sum(
        full(p.grad)[FROZEN].abs().sum().item()
        for name, p in model.named_parameters()
        if ".experts." in name
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_frozen_experts_and_routers_stay_bit_identical(layout):
    world, overrides = LAYOUTS[layout]
    cfg = config(**overrides)
    before, after, frozen_grads, requires_grad = run_ranks(
        world, train_frozen, cfg, int(torch.randint(2**30, ()))
    )[0]
    assert frozen_grads["before"] > 0 and frozen_grads["after"] == 0
    others = [e for e in range(cfg.moe.num_experts) if e not in FROZEN]
    n_experts = n_routers = 0
    for name, old in before.items():
        new = after[name]
        if ".experts." in name:
            n_experts += 1
            assert torch.equal(new[FROZEN], old[FROZEN]), name
            assert (new[others] != old[others]).flatten(1).any(1).all(), name
        elif ".router." in name:
            n_routers += 1
            assert torch.equal(new, old) and not requires_grad[name], name
        else:
            assert not torch.equal(new, old) and requires_grad[name], name
    assert n_experts == 2 * 2 and n_routers == 2  # two MoE blocks of w13 and w2
