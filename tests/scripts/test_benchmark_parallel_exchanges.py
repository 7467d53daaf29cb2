"""``scripts/benchmark_parallel.py`` compares the expert-parallel exchanges against a plain
all-to-all replay of the same calls: on gloo ranks (EP2, and EP2 x ETP2) it records every
dispatcher's exchange (all-to-all with host splits, sync-free with equal blocks, inside expert
tensor parallelism), leaves the layer's output unchanged, and replays the calls."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed.launcher import run_ranks
from tests.distributed.test_ep_padding import TOKENS_PER_RANK, make_layer, tokens
from tests.scripts.conftest import load_script
from torchmoe.parallel.expert_parallel import apply_ep


def _record(rank: int, dispatcher: str, etp: int) -> tuple:
    bench = load_script("benchmark_parallel")
    mesh = init_device_mesh("cpu", (2, etp), mesh_dim_names=("ep", "etp"))
    x = tokens(2 * etp)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK].view(1, -1, 16)
    plain = make_layer()
    apply_ep(plain, mesh, dispatcher)
    recorded = make_layer()
    apply_ep(recorded, mesh, dispatcher)
    calls: list = []
    wrapped = bench.record_exchanges(recorded, calls)
    same = torch.equal(recorded(x), plain(x))
    summary = [
        (rows, tuple(row), dtype, out_splits, in_splits)
        for rows, row, dtype, out_splits, in_splits, _ in calls
    ]
    seconds = bench.replay_exchanges(calls, 1, torch.device("cpu"))
    return wrapped, same, summary, seconds


@pytest.mark.parametrize("dispatcher, etp", [("alltoall", 1), ("sync_free", 1), ("alltoall", 2)])
def test_every_exchange_is_recorded_and_replayed(dispatcher, etp):
    for wrapped, same, calls, seconds in run_ranks(2 * etp, _record, dispatcher, etp):
        assert wrapped == 1 and same
        assert len(calls) == 2  # dispatch, then combine
        (sent, row, dtype, out_splits, in_splits), back = calls
        assert row == (16,) and dtype == torch.float64
        if dispatcher == "sync_free":
            assert out_splits is None and in_splits is None
        else:  # the combine sends back what the dispatch received
            assert sent == sum(in_splits) and back[0] == sum(out_splits)
            assert back[3:] == (in_splits, out_splits)
        assert seconds > 0


def test_a_layer_without_expert_parallelism_has_nothing_to_record():
    assert load_script("benchmark_parallel").record_exchanges(make_layer(), []) == 0
