"""Each parallel layout trains like the single process: same losses over 3 steps, same final
parameters (float32, gloo, forked CPU ranks). All runs start from one seed checkpoint, and two
experts are biased out of the routing so some experts get no tokens (uneven routing)."""

import json
import math
import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.distributed.launcher import run_ranks
from torchmoe.config.load import build_config
from torchmoe.config.pipeline_keys import V_SHAPED
from torchmoe.data.prefetch import Batch
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.parallel.pipeline import STAGES_TAKE_GRAD_SHAPES
from torchmoe.train.trainer import Trainer

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 3


def dualpipev_overlap(dispatcher: str) -> dict[str, str | int]:
    """PP2 x CP2 x EP2 (experts over the cp ranks, so each rank keeps 4 micro-batches, which
    DualPipeV's 4 stages need) with parallelism.pp_ep_overlap."""
    return {
        "parallelism.pp": 2,
        "parallelism.cp": 2,
        "parallelism.ep": 2,
        "parallelism.pp_schedule": "DualPipeV",
        "parallelism.pp_ep_overlap": "true",
        "moe.dispatcher": dispatcher,
        "model.n_layers": 4,
    }


LAYOUTS = {
    "fsdp2": (2, {}),
    "fsdp2_reshard_never": (2, {"parallelism.fsdp_reshard_after_forward": "never"}),
    "hsdp_2x2": (4, {"parallelism.dp_replicate": 2, "parallelism.dp_shard": 2}),
    "ep2": (2, {"parallelism.ep": 2}),
    "ep4": (4, {"parallelism.ep": 4}),
    "fsdp2_x_ep2": (4, {"parallelism.ep": 2}),
    "hsdp_x_ep2": (4, {"parallelism.dp_replicate": 2, "parallelism.ep": 2}),
    "ep2_allgather": (2, {"parallelism.ep": 2, "moe.dispatcher": "allgather"}),
    "ep2_sync_free": (2, {"parallelism.ep": 2, "moe.dispatcher": "sync_free"}),
    "fsdp2_x_ep2_sync_free_x_cp2": (
        4,
        {"parallelism.ep": 2, "parallelism.cp": 2, "moe.dispatcher": "sync_free"},
    ),
    "fsdp4_x_ep2_allgather": (4, {"parallelism.ep": 2, "moe.dispatcher": "allgather"}),
    "etp2": (2, {"parallelism.etp": 2}),
    "ep2_x_etp2": (4, {"parallelism.ep": 2, "parallelism.etp": 2}),
    "ep2_x_etp2_allgather": (
        4,
        {"parallelism.ep": 2, "parallelism.etp": 2, "moe.dispatcher": "allgather"},
    ),
    "tp2": (2, {"parallelism.tp": 2}),
    "tp2_q_lora": (2, {"parallelism.tp": 2, "model.q_lora_rank": 32}),
    "fsdp2_x_tp2": (4, {"parallelism.tp": 2}),
    "replicate2_x_tp2": (4, {"parallelism.dp_replicate": 2, "parallelism.tp": 2}),
    "tp2_x_ep2": (2, {"parallelism.tp": 2, "parallelism.ep": 2}),
    "fsdp2_x_tp2_x_ep2": (4, {"parallelism.tp": 2, "parallelism.ep": 2}),
    "mixtral_tp2": (2, {"parallelism.tp": 2, "model.name": "mixtral"}),
    "mixtral_fsdp2_x_ep2": (4, {"parallelism.ep": 2, "model.name": "mixtral"}),
    "qwen3_tp2": (2, {"parallelism.tp": 2, "model.name": "qwen3_moe"}),
    "mtp_fsdp2_x_ep2": (4, {"parallelism.ep": 2, "model.mtp_num_layers": 1}),
    "qwen3_ep2": (2, {"parallelism.ep": 2, "model.name": "qwen3_moe"}),
    "tp2_x_ep2_allgather": (
        2,
        {"parallelism.tp": 2, "parallelism.ep": 2, "moe.dispatcher": "allgather"},
    ),
    **{
        f"pp2_{schedule}": (
            2,
            {"parallelism.pp": 2, "parallelism.pp_schedule": schedule, "model.n_layers": 4},
        )
        for schedule in (
            "GPipe",
            "1F1B",
            "Interleaved1F1B",
            "LoopedBFS",
            "InterleavedZeroBubble",
            "ZBVZeroBubble",
            "DualPipeV",
        )
    },
    "pp2_x_fsdp2": (4, {"parallelism.pp": 2, "model.n_layers": 4}),
    "pp2_two_sequences_per_microbatch": (
        2,
        {"parallelism.pp": 2, "model.n_layers": 4, "parallelism.pp_microbatches": 2},
    ),
    "pp2_x_ep2": (4, {"parallelism.pp": 2, "parallelism.ep": 2, "model.n_layers": 4}),
    "pp2_x_tp2": (4, {"parallelism.pp": 2, "parallelism.tp": 2, "model.n_layers": 4}),
    "pp2_mtp2": (2, {"parallelism.pp": 2, "model.n_layers": 4, "model.mtp_num_layers": 2}),
    "pp2_zbv_x_fsdp2_mtp": (
        4,
        {
            "parallelism.pp": 2,
            "parallelism.pp_schedule": "ZBVZeroBubble",
            "model.n_layers": 4,
            "model.mtp_num_layers": 1,
        },
    ),
    # packed documents kept apart (document ids reach every pipeline stage, the mask every
    # tensor-parallel rank)
    # torchmoe's AdamW (clipping folded into the update) on DTensor shards of two meshes
    "torchmoe_adamw_fsdp2_x_ep2": (
        4,
        {"parallelism.ep": 2, "optimizer.implementation": "torchmoe"},
    ),
    "torchmoe_adamw_tp2": (2, {"parallelism.tp": 2, "optimizer.implementation": "torchmoe"}),
    "torchmoe_adamw_pp2_x_fsdp2": (  # the norm summed over stages before the fold
        4,
        {"parallelism.pp": 2, "model.n_layers": 4, "optimizer.implementation": "torchmoe"},
    ),
    "block_causal_fsdp2_x_ep2": (4, {"parallelism.ep": 2, "model.attn_mask": "block_causal"}),
    "block_causal_tp2": (2, {"parallelism.tp": 2, "model.attn_mask": "block_causal"}),
    "qwen3_block_causal_tp2": (
        2,
        {"parallelism.tp": 2, "model.name": "qwen3_moe", "model.attn_mask": "block_causal"},
    ),
    "block_causal_pp2_mtp": (
        2,
        {
            "parallelism.pp": 2,
            "model.n_layers": 4,
            "model.mtp_num_layers": 1,
            "model.attn_mask": "block_causal",
        },
    ),
    # context parallelism: each rank holds a head and a tail chunk of every sequence
    "cp2": (2, {"parallelism.cp": 2}),
    "cp2_x_fsdp2": (4, {"parallelism.cp": 2}),
    "cp2_x_ep2": (2, {"parallelism.cp": 2, "parallelism.ep": 2}),
    "cp2_x_fsdp2_x_ep4": (4, {"parallelism.cp": 2, "parallelism.ep": 4}),
    "cp2_x_tp2": (4, {"parallelism.cp": 2, "parallelism.tp": 2}),
    "hsdp_2x1_x_cp2": (4, {"parallelism.dp_replicate": 2, "parallelism.cp": 2}),
    "cp2_full_ac": (2, {"parallelism.cp": 2, "activation_checkpoint.mode": "full"}),
    "cp2_recompute_mla_up_proj_core_attn": (  # the latents' gather and the kernel rerun
        2,
        {
            "parallelism.cp": 2,
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.recompute_modules": "mla_up_proj,core_attn",
        },
    ),
    "qwen3_cp2": (2, {"parallelism.cp": 2, "model.name": "qwen3_moe"}),
    "block_causal_cp2": (2, {"parallelism.cp": 2, "model.attn_mask": "block_causal"}),
    "mtp_cp2": (2, {"parallelism.cp": 2, "model.mtp_num_layers": 1}),
    "pp2_x_cp2": (4, {"parallelism.pp": 2, "parallelism.cp": 2, "model.n_layers": 4}),
    "block_causal_mtp_pp2_zbv_x_cp2": (
        4,
        {
            "parallelism.pp": 2,
            "parallelism.pp_schedule": "ZBVZeroBubble",
            "parallelism.cp": 2,
            "model.n_layers": 4,
            "model.mtp_num_layers": 1,
            "model.attn_mask": "block_causal",
        },
    ),
    "block_causal_mtp2_cp2_x_fsdp2_x_ep2": (
        4,
        {
            "parallelism.cp": 2,
            "parallelism.ep": 2,
            "model.mtp_num_layers": 2,
            "model.attn_mask": "block_causal",
        },
    ),
    "qwen3_block_causal_cp2_x_tp2": (
        4,
        {
            "parallelism.cp": 2,
            "parallelism.tp": 2,
            "model.name": "qwen3_moe",
            "model.attn_mask": "block_causal",
        },
    ),
    # DualPipeV's overlapped steps as two turn-taking threads (experts split over the cp ranks)
    **{
        f"pp2_dualpipev_x_cp2_x_ep2_{dispatcher}_overlap": (4, dualpipev_overlap(dispatcher))
        for dispatcher in ("alltoall", "sync_free")
    },
    "pp2_interleaved_x_fsdp2_x_ep2": (
        4,
        {
            "parallelism.pp": 2,
            "parallelism.ep": 2,
            "parallelism.pp_schedule": "Interleaved1F1B",
            "model.n_layers": 4,
        },
    ),
}
# Balance losses count whole sequences under tensor parallelism (the plan all-reduces the counts
# over tp), so they are layout-independent there; but Mixtral's and Qwen3's batch-level
# aux_loss is computed per data-parallel rank's micro-batch, a different (documented) objective
# from one process's whole batch. Those layouts are compared with balance losses off.
NO_BALANCE_LOSS = {"moe.load_balancing_type": "none", "moe.aux_loss_coeff": 0.0}


def data_parallel(world: int, overrides: dict) -> int:
    degrees = (overrides.get(f"parallelism.{k}", 1) for k in ("tp", "pp", "cp"))
    return world // math.prod(degrees)


def balance_loss_is_layout_dependent(world: int, overrides: dict) -> bool:
    dp = data_parallel(world, overrides)
    return overrides.get("model.name") in ("mixtral", "qwen3_moe") and dp > 1


def config(folder, cache, dp=1, **overrides):
    values = {
        "job.dump_folder": str(folder),
        "data.cache_dir": cache,
        "checkpoint.enable": "true",
        "checkpoint.folder": "ckpt",
        "checkpoint.interval": "1000",
        "training.seq_len": str(SEQ),
        "training.local_batch_size": str(GLOBAL_BATCH // dp),
        "training.steps": str(STEPS),
        "metrics.log_freq": "1",
        "model.dim": "64",
        "model.inter_dim": "128",
        "moe.ffn_hidden_size": "32",
        "moe.shared_expert_intermediate_size": "32",
        "moe.bias_update_rate": "0.01",
        "lr_scheduler.warmup_steps": "1",
        "optimizer.lr": "1e-2",
        "training.max_norm": "0.1",  # below the gradient norm: clipping is exercised
        # Adam's eps bounds how much it magnifies float32 noise in near-zero gradients.
        "optimizer.eps": "1e-6",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return build_config({}, list(values.items()))


def batches(seed=0):
    """The same global batches for every layout: random tokens (fresh per test session seed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def rank_batches(cfg, data, rank_rows: slice):
    """This rank's rows of each global batch; with block-causal attention, documents of
    random lengths (the same at every layout: a generator of their own)."""
    g = torch.Generator().manual_seed(1)
    for b in data:
        starts = torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.15
        documents = starts.cumsum(dim=1) if cfg.model.attn_mask == "block_causal" else None
        rows = b[rank_rows]
        yield Batch(rows[:, :-1], rows[:, 1:], None if documents is None else documents[rank_rows])


def merged(results) -> tuple[list[float], dict]:
    """Rank 0's losses and the union of every rank's parameters (pipeline stages differ)."""
    return results[0][0], {k: v for _, params in results for k, v in params.items()}


def train_and_collect(rank, cfg, data):
    trainer = Trainer(cfg, device=torch.device("cpu"))
    dp, r = trainer.dims.dp, trainer.dims.dp_rank()
    rows = GLOBAL_BATCH // dp
    trainer.batches = rank_batches(cfg, data, slice(r * rows, (r + 1) * rows))
    losses = trainer.train()
    # every rank: pipeline stages hold different parameters
    return losses, get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True)
    )


@pytest.fixture(scope="module")
def seed_and_references(tmp_path_factory, data_cache):
    """One seed checkpoint per model variant, and the single-process run from it, on demand."""
    load_stdlib_docs(data_cache)  # generate once, before ranks fork
    root = tmp_path_factory.mktemp("layouts")
    data = batches()
    cache = {}

    def get(model_overrides: dict):
        key = tuple(sorted(model_overrides.items()))
        if key not in cache:
            name = f"variant{len(cache)}"
            seed_cfg = config(
                root / name / "seed",
                data_cache,
                **{"checkpoint.create_seed_checkpoint": "true"},
                **model_overrides,
            )
            trainer = Trainer(seed_cfg, device=torch.device("cpu"))
            for moe in trainer.moe_layers:
                if moe.router.expert_bias is not None:
                    moe.router.expert_bias[:2] = -10.0  # experts 0 and 1 receive no tokens
            trainer.checkpoint.save_seed()
            shutil.copytree(root / name / "seed", root / name / "reference")
            [(losses, params)] = run_ranks(
                1,
                train_and_collect,
                config(root / name / "reference", data_cache, **model_overrides),
                data,
            )
            cache[key] = (root / name, losses, params)
        return cache[key]

    return get, data


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, seed_and_references, data_cache):
    get, data = seed_and_references
    world, overrides = LAYOUTS[layout]
    if overrides.get("parallelism.pp_schedule") in V_SHAPED and not STAGES_TAKE_GRAD_SHAPES:
        pytest.skip("V-shaped schedules on gloo need torch >= 2.13 (a one-line error before)")
    model_overrides = {k: v for k, v in overrides.items() if k.startswith("model.")}
    if balance_loss_is_layout_dependent(world, overrides):
        model_overrides.update(NO_BALANCE_LOSS)
    variant, ref_losses, ref_params = get(model_overrides)
    shutil.copytree(variant / "seed", variant / layout)
    dp = data_parallel(world, overrides)
    cfg = config(
        variant / layout,
        data_cache,
        dp=dp,
        **overrides,
        **NO_BALANCE_LOSS if balance_loss_is_layout_dependent(world, overrides) else {},
    )
    results = run_ranks(world, train_and_collect, cfg, data)
    losses, params = merged(results)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        # Adam moves every weight by ~lr = 1e-2 per step; float32 summation-order noise is ~1e-5.
        torch.testing.assert_close(
            params[name], ref, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert all(r[0] == losses for r in results)  # every rank logs the global loss
    # rank 0 logs every layer's expert load, whichever pipeline stage holds the layer
    for logged, ref in zip(logged_rows(variant / layout), logged_rows(variant / "reference")):
        assert logged["per_layer"]["tokens"] == ref["per_layer"]["tokens"]
        torch.testing.assert_close(
            logged["per_layer"].get("bias_norm"), ref["per_layer"].get("bias_norm")
        )
        assert ("mtp_loss" in logged) == ("mtp_loss" in ref)
        if "mtp_loss" in ref:
            assert logged["mtp_loss"] == pytest.approx(ref["mtp_loss"], rel=1e-5)


def logged_rows(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    return rows
