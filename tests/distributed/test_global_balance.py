"""The global aux loss and the expert-bias update do not depend on the layout: trained from one
seed checkpoint on the same global batches, 2 ranks (FSDP, EP2, EP2 with the all-gather
dispatcher, Mixtral under FSDP x EP) log the same per-layer global aux loss, apply the same
expert bias and reach the same parameters as one process (float32, gloo)."""

import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.distributed.launcher import run_ranks
from tests.distributed.test_layouts import GLOBAL_BATCH, batches, config, rank_batches
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer

GLOBAL_AUX = {"moe.load_balancing_type": "global_aux_loss", "moe.aux_loss_coeff": "0.05"}
LAYOUTS = {
    "fsdp2": (2, {}),
    "ep2": (2, {"parallelism.ep": 2}),
    "ep2_allgather": (2, {"parallelism.ep": 2, "moe.dispatcher": "allgather"}),
    "mixtral_fsdp2_x_ep2": (4, {"parallelism.ep": 2, "model.name": "mixtral"}),
}


def train_steps(rank, cfg, data):
    """Per step: the logged per-layer global aux loss and every layer's expert bias; at the
    end the full parameters (rank 0)."""
    trainer = Trainer(cfg, device=torch.device("cpu"))
    trainer.checkpoint.load()
    dp, r = trainer.dims.dp, trainer.dims.dp_rank()
    rows = GLOBAL_BATCH // dp
    trainer.batches = rank_batches(cfg, data, slice(r * rows, (r + 1) * rows))
    aux, biases = [], []
    for _ in data:
        stats = trainer.train_step().moe
        aux.append(stats["global_aux_loss"].clone())
        biases.append(
            [
                m.router.expert_bias.clone()
                for m in trainer.moe_layers
                if m.router.expert_bias is not None
            ]
        )
    full = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return aux, biases, full if rank == 0 else None


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_global_aux_loss_and_bias_match_single_process(layout, tmp_path, data_cache):
    load_stdlib_docs(data_cache)
    world, overrides = LAYOUTS[layout]
    model = {k: v for k, v in overrides.items() if k.startswith("model.")}
    seed = config(
        tmp_path / "seed",
        data_cache,
        **{"checkpoint.create_seed_checkpoint": "true"},
        **GLOBAL_AUX,
        **model,
    )
    Trainer(seed, device=torch.device("cpu")).train()
    data = batches(seed=3)[:2]
    results = {}
    for name, ranks, extra in (("reference", 1, model), (layout, world, overrides)):
        shutil.copytree(tmp_path / "seed", tmp_path / name)
        cfg = config(tmp_path / name, data_cache, dp=ranks, **GLOBAL_AUX, **extra)
        results[name] = run_ranks(ranks, train_steps, cfg, data)[0]
    (ref_aux, ref_bias, ref_params), (aux, bias, params) = results["reference"], results[layout]
    assert all(a.gt(0).all() for a in ref_aux)  # the loss is on in every layer
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bias, ref_bias, rtol=0, atol=1e-6)
    if model.get("model.name") != "mixtral":  # the DeepSeek flavor balances by bias too
        assert any(b.abs().sum() > 0 for step in ref_bias for b in step)
    for key, ref in ref_params.items():
        torch.testing.assert_close(
            params[key], ref, rtol=1e-4, atol=5e-5, msg=lambda m, key=key: f"{key}: {m}"
        )
