"""torch.compile per block: one graph per MoE block (fullgraph), same numbers as eager."""

import copy

import pytest
import torch

from torchmoe.config.load import build_config
from torchmoe.config.registry import build_model
from torchmoe.config.schema import Compile
from torchmoe.models.moe.balance import set_aux_loss_scale
from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.compile import apply_compile


def _tiny_moe_model(**overrides: str) -> torch.nn.Module:
    """One MLA + MoE block (a dense block would only add compile time) with a balance loss."""
    values = {
        "model.dim": "64",
        "model.n_layers": "1",
        "model.n_dense_layers": "0",
        "moe.ffn_hidden_size": "32",
        "moe.shared_expert_intermediate_size": "32",
        "training.seq_len": "32",
        "moe.grouped_mm": "grouped_mm",
        "moe.load_balancing_type": "seq_aux_loss",
        "moe.aux_loss_coeff": "0.1",
        **overrides,
    }
    cfg = build_config({}, list(values.items()))
    model = build_model(cfg)
    model.init_weights(0.02, cfg.model.n_layers)
    return model


def _step(
    model: torch.nn.Module, tokens: torch.Tensor, document_ids: torch.Tensor | None = None
) -> None:
    # _grouped_mm traces for bfloat16 only, so both runs use bf16 autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, document_ids=document_ids)
    out.float().pow(2).mean().backward()


def _moe(model: torch.nn.Module) -> MoE:
    return next(m for m in model.modules() if isinstance(m, MoE))


def test_compiled_block_matches_eager_with_counts_and_aux_scale():
    torch.manual_seed(0)
    eager = _tiny_moe_model()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, Compile(enable=True), fullgraph=True)  # a graph break would raise
    for scale in (1.0, 0.25):  # the aux-loss scale must not be baked into the compiled graph
        set_aux_loss_scale(scale)
        tokens = torch.randint(0, 4000, (2, 32))
        for model in (eager, compiled):
            model.zero_grad()
            _moe(model).tokens_per_expert.zero_()
            _step(model, tokens)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=2e-4, msg=name)
        assert torch.equal(_moe(compiled).tokens_per_expert, _moe(eager).tokens_per_expert)
        assert _moe(compiled).tokens_per_expert.sum() == 2 * 32 * 2
    set_aux_loss_scale(1.0)
    gate = _moe(eager).router.gate.weight.grad
    assert gate.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [
        {
            "moe.capacity_factor": "0.8",
            "moe.pad_to_capacity": "true",
            "moe.drop_policy": "probs",
            "moe.z_loss_coeff": "0.01",
        },
        {
            "moe.capacity_factor": "1.0",
            "moe.drop_policy": "position",
            "moe.load_balancing_type": "aux_loss,global_aux_loss",
            "moe.aux_loss_coeff": "0.1,0.1",
        },
        {
            "moe.load_balancing_type": "sinkhorn",
            "moe.aux_loss_coeff": "0",
            "moe.enable_expert_bias": "false",
            "moe.router_num_groups": "0",
            "moe.router_group_topk": "0",
            "moe.router_score_function": "softmax",
        },
        {"moe.force_load_balance": "true"},
    ],
    ids=["capacity_padded_zloss", "capacity_position_global_aux", "sinkhorn", "forced_balance"],
)
def test_routing_options_compile_fullgraph_and_match_eager(options):
    torch.manual_seed(0)
    eager = _tiny_moe_model(**options)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, Compile(enable=True), fullgraph=True)
    tokens = torch.randint(0, 4000, (2, 32))
    for model in (eager, compiled):
        _step(model, tokens)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=2e-4, msg=name)
    assert torch.equal(_moe(compiled).tokens_per_expert, _moe(eager).tokens_per_expert)
    torch.testing.assert_close(_moe(compiled).stats, _moe(eager).stats, rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 training step on a GPU")
@pytest.mark.parametrize("ac_mode", ["none", "selective"])
def test_compiled_training_step_matches_eager_on_gpu(tiny_config, ac_mode):
    from torchmoe.train.trainer import Trainer

    def run(compile_: bool) -> list[float]:
        cfg = tiny_config(
            **{
                "compile.enable": compile_,
                "training.steps": 3,
                "activation_checkpoint.mode": ac_mode,
                "moe.load_balancing_type": "seq_aux_loss",
                "moe.aux_loss_coeff": 0.01,
            }
        )
        torch.manual_seed(0)
        return Trainer(cfg, device=torch.device("cuda")).train()

    # Steps 2 and 3 see the parameters after compiled backward + update: within bf16 noise.
    assert run(True) == pytest.approx(run(False), rel=2e-2)


def test_a_block_with_a_document_mask_compiles_fullgraph_and_matches_eager():
    """The mask is an input of the compiled block, not a constant: new documents each step
    reuse the graph and give eager's numbers."""
    torch.manual_seed(0)
    eager = _tiny_moe_model()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, Compile(enable=True), fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for _ in range(2):
        tokens = torch.randint(0, 4000, (2, 32))
        documents = (torch.rand(2, 32) < 0.2).cumsum(dim=1)
        for model in (eager, compiled):
            model.zero_grad()
            _step(model, tokens, documents)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=2e-4, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_mtp_blocks_are_compiled_and_checkpointed_like_the_others():
    """In float32 (loop experts, so not fullgraph): bf16 rounding would flip the MTP router's
    near-ties between the compiled and the eager run."""
    from torchmoe.config.schema import ActivationCheckpoint
    from torchmoe.parallel.activation_checkpoint import apply_ac

    torch.manual_seed(0)
    eager = _tiny_moe_model(
        **{"model.mtp_num_layers": "1", "model.mtp_loss_scale": "0.5", "moe.grouped_mm": "loop"}
    )
    compiled = copy.deepcopy(eager)
    apply_ac(compiled, ActivationCheckpoint(mode="full"))
    apply_compile(compiled, Compile(enable=True), fullgraph=False)
    assert isinstance(compiled.mtp[0].block, torch._dynamo.eval_frame.OptimizedModule)
    assert "CheckpointWrapper" in type(compiled.mtp[0].block._orig_mod).__name__
    tokens = torch.randint(0, 4000, (2, 33))
    for model in (eager, compiled):
        model(tokens[:, :-1], tokens[:, 1:]).pow(2).mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled.mtp.loss_sum, eager.mtp.loss_sum)
    assert eager.mtp.loss_sum > 0
