"""Same seed and global batch, same run: the real loader and initialisation (no seed checkpoint)
give equal losses on one process with gradient accumulation, FSDP2 x EP2 on 4 ranks, TP2, PP2
and CP2; and a checkpoint from 4 data-parallel ranks resumes at 2 and at 1 with its data position
(elastic resume), and under CP2, continuing the uninterrupted run's losses."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_ranks
from torchmoe.config.load import build_config
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer

GLOBAL_BATCH, STEPS = 4, 4


def config(folder, cache, seed: int, local_batch: int, **overrides):
    """Validation reads its own file, so turning it off (pipeline runs) leaves the training
    data as it is (a held-out share would change it)."""
    values = {
        "job.dump_folder": str(folder),
        "data.cache_dir": cache,
        "training.seed": str(seed),
        "training.seq_len": "32",
        "training.global_batch_size": str(GLOBAL_BATCH),
        "training.local_batch_size": str(local_batch),
        "training.steps": str(STEPS),
        "model.n_layers": "4",
        "model.dim": "64",
        "model.inter_dim": "128",
        "moe.ffn_hidden_size": "32",
        "moe.shared_expert_intermediate_size": "32",
        "lr_scheduler.warmup_steps": "1",
        "optimizer.lr": "1e-2",
        "optimizer.eps": "1e-6",  # bounds how much Adam magnifies float32 noise
        "checkpoint.enable": "true",
        "checkpoint.interval": "2",
        "validation.enable": "true",
        "validation.dataset": str(Path(cache) / "validation.jsonl"),
        "validation.freq": "2",
        "validation.steps": "1",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return build_config({}, list(values.items()))


def train(rank: int, cfg) -> list[float]:
    return Trainer(cfg, device=torch.device("cpu")).train()


def train_and_validate(rank: int, cfg) -> tuple[list[float], list[tuple[int, float]]]:
    trainer = Trainer(cfg, device=torch.device("cpu"))
    return trainer.train(), trainer.validator.history


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """The 4-rank FSDP2 x EP2 run (its checkpoints kept) and the one-process run."""
    docs = load_stdlib_docs(data_cache)  # generate once, before ranks fork
    lines = [json.dumps({"text": doc}) for doc in docs[-40:]]
    (Path(data_cache) / "validation.jsonl").write_text("\n".join(lines) + "\n")
    root = tmp_path_factory.mktemp("independent")
    seed = int(torch.randint(0, 10_000, ()))
    four = run_ranks(
        4,
        train_and_validate,
        config(root / "fsdp2_x_ep2", data_cache, seed, 1, **{"parallelism.ep": 2}),
    )
    [one] = run_ranks(1, train_and_validate, config(root / "one", data_cache, seed, 1))
    return root, seed, four[0], one


def test_one_process_with_accumulation_equals_fsdp2_x_ep2(runs):
    _, _, (four, four_val), (one, one_val) = runs
    assert len(one) == STEPS
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-5)
    assert one[-1] < one[0]  # it trained
    # the held-out loss too, after steps 2 and 4
    assert [s for s, _ in one_val] == [s for s, _ in four_val] == [2, 4]
    torch.testing.assert_close(
        [v for _, v in four_val], [v for _, v in one_val], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "name, overrides, local_batch",
    [
        ("tp2", {"parallelism.tp": 2}, 2),
        ("pp2", {"parallelism.pp": 2}, 4),
        ("pp2_interleaved", {"parallelism.pp": 2, "parallelism.pp_schedule": "Interleaved1F1B"}, 4),
        ("cp2", {"parallelism.cp": 2}, 4),
    ],
)
def test_tensor_and_pipeline_parallel_equal_one_process(
    runs, data_cache, name, overrides, local_batch
):
    """Training and validation losses (validation runs forward only through the schedule)."""
    root, seed, _, (one, one_val) = runs
    cfg = config(root / name, data_cache, seed, local_batch, **overrides)
    (losses, val), *others = run_ranks(2, train_and_validate, cfg)
    torch.testing.assert_close(losses, one, rtol=1e-5, atol=1e-5)
    assert [s for s, _ in val] == [s for s, _ in one_val] == [2, 4]
    torch.testing.assert_close([v for _, v in val], [v for _, v in one_val], rtol=1e-5, atol=1e-5)
    assert all(o[1] == val for o in others)  # every rank logs the same held-out loss


@pytest.mark.parametrize("ranks", [2, 1])
def test_resume_at_fewer_data_parallel_ranks(runs, data_cache, ranks):
    root, seed, (four, _), _ = runs
    folder = root / f"resumed_at_{ranks}"
    shutil.copytree(
        root / "fsdp2_x_ep2" / "checkpoint" / "step-2", folder / "checkpoint" / "step-2"
    )
    cfg = config(folder, data_cache, seed, GLOBAL_BATCH // ranks // (2 if ranks == 1 else 1))
    losses = run_ranks(ranks, train, cfg)[0]
    torch.testing.assert_close(losses, four[2:], rtol=1e-5, atol=1e-5)


def test_resume_under_context_parallelism(runs, data_cache):
    """The 4-rank FSDP2 x EP2 checkpoint resumes on 2 ranks that split every sequence (CP2)."""
    root, seed, (four, _), _ = runs
    folder = root / "resumed_at_cp2"
    shutil.copytree(
        root / "fsdp2_x_ep2" / "checkpoint" / "step-2", folder / "checkpoint" / "step-2"
    )
    cfg = config(folder, data_cache, seed, GLOBAL_BATCH, **{"parallelism.cp": 2})
    losses = run_ranks(2, train, cfg)[0]
    torch.testing.assert_close(losses, four[2:], rtol=1e-5, atol=1e-5)
