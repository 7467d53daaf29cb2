"""parallelism.pp_ep_overlap: the baton two threads take turns with, DualPipeV's overlapped
steps handing over at every expert all-to-all (the numerics are in test_layouts.py), and the
settings it refuses."""

import threading

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.distributed.test_layouts import (
    GLOBAL_BATCH,
    batches,
    config,
    dualpipev_overlap,
    rank_batches,
)
from torchmoe.config.errors import ConfigError
from torchmoe.parallel.ep_overlap import BATON, Baton
from torchmoe.train.trainer import Trainer


def test_two_threads_take_turns_and_a_finished_one_lets_the_other_run_on():
    baton, events = Baton(), []

    def worker(name: str, steps: int):
        def run():
            for i in range(steps):
                events.append((name, i, threading.get_ident()))
                baton.hand_over()

        return run

    baton.run(worker("f", 3), worker("b", 5))
    assert [(n, i) for n, i, _ in events] == [
        ("f", 0),
        ("b", 0),
        ("f", 1),
        ("b", 1),
        ("f", 2),
        ("b", 2),
        ("b", 3),
        ("b", 4),
    ]
    assert len({t for n, _, t in events if n == "f"}) == 1
    assert {t for n, _, t in events if n == "b"}.isdisjoint({t for n, _, t in events if n == "f"})
    baton.hand_over()  # outside run: a no-op that returns


def test_an_error_in_either_thread_releases_the_other_and_is_raised():
    baton, ran = Baton(), []

    def fails():
        baton.hand_over()
        raise ValueError("backward failed")

    def runs_on():
        for i in range(3):
            ran.append(i)
            baton.hand_over()

    with pytest.raises(ValueError, match="backward failed"):
        baton.run(runs_on, fails)
    assert ran == [0, 1, 2]


def _turns(rank: int, folder: str, cache: str, dispatcher: str):
    overrides = dualpipev_overlap(dispatcher) | {"training.steps": 1, "checkpoint.enable": "false"}
    cfg = config(f"{folder}/{rank}", cache, **overrides)
    trainer = Trainer(cfg, device=torch.device("cpu"))
    trainer.batches = rank_batches(cfg, batches()[:1], slice(0, GLOBAL_BATCH))
    BATON.turns.clear()
    trainer.train()
    kept = sum(len(s.output_chunks) for s in trainer.pipeline.schedule._stages)
    return list(BATON.turns), kept


@pytest.mark.parametrize("dispatcher", ["alltoall", "sync_free"])
def test_overlapped_steps_hand_over_at_the_exchanges(tmp_path, data_cache, dispatcher):
    """pp rank 1 holds MoE layers in both its stages: forward and backward alternate, the
    forward first. pp rank 0's first stage is the dense layer: its forward hands over to a
    backward without exchanges, which runs to its end in one turn."""
    results = run_ranks(4, _turns, str(tmp_path), data_cache, dispatcher)
    turns = [t for t, _ in results]
    assert [kept for _, kept in results] == [0] * 4  # the trainer asks for no outputs
    both = turns[2]
    assert both.count("backward") >= 4 and both == turns[3]
    assert both == ["forward", "backward"] * (len(both) // 2)
    assert turns[0] == turns[1] and set(turns[0]) == {"forward"}


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"parallelism.pp": 2}, "pp_schedule = 'DualPipeV' (have pp = 2, '1F1B')"),
        ({"parallelism.pp_schedule": "DualPipeV"}, "(have pp = 1, 'DualPipeV')"),
        (
            {"parallelism.pp": 2, "parallelism.pp_schedule": "DualPipeV"},
            "parallelism.ep > 1 (have 1)",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "DualPipeV",
                "parallelism.ep": 2,
                "moe.dispatcher": "allgather",
            },
            "(have 'allgather', which exchanges no all-to-all)",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "DualPipeV",
                "parallelism.ep": 2,
                "parallelism.etp": 2,
            },
            "parallelism.etp = 1 (have 2; not supported yet)",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "DualPipeV",
                "parallelism.ep": 2,
                "compile.enable": "true",
            },
            "compile.enable = false",
        ),
    ],
)
def test_settings_the_overlap_needs_are_one_line(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        tiny_config(**{"parallelism.pp_ep_overlap": "true", **overrides})
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("parallelism.pp_ep_overlap = true needs ")
