"""Stage layout (parallel/pipeline_layout.py), splitting (pipeline_stage.py) and the pp_* key
checks (config/pipeline_keys.py), on one process (the schedules against the single process are
in tests/distributed/test_layouts.py)."""

import itertools
import re

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.pipeline_keys import check_pipeline, num_stages, stage_ids
from torchmoe.config.registry import build_model
from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.pipeline_layout import (
    balance_ranks,
    balanced_split,
    describe_layout,
    rank_loads,
    stage_costs,
    stage_layout,
    unit_costs,
)
from torchmoe.parallel.pipeline_stage import LocalStages, split_stage


def meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg)


def config(**overrides):
    return build_config({}, [(k, str(v)) for k, v in overrides.items()])


@pytest.mark.parametrize("n,stages", [(1, 1), (5, 1), (5, 5), (7, 3), (9, 4)])
def test_balanced_split_is_optimal(n, stages):
    """Against every composition of n blocks into stages of at least one."""
    g = torch.Generator().manual_seed(n * 10 + stages)
    for _ in range(5):
        costs = torch.rand(n, generator=g, dtype=torch.float64).tolist()
        first, last = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        counts = balanced_split(costs, stages, first, last)
        assert len(counts) == stages and sum(counts) == n and min(counts) >= 1
        best = min(
            max(stage_costs(c, costs, first, last))
            for cuts in itertools.combinations(range(1, n), stages - 1)
            for c in [[b - a for a, b in zip((0, *cuts), (*cuts, n))]]
        )
        assert max(stage_costs(counts, costs, first, last)) == pytest.approx(best, rel=1e-12)


def test_several_stages_per_rank_balance_the_ranks():
    """Looped over 2 ranks, a heavy embedding: per stage [1, 2, 2, 2] (max stage 4) leaves rank 0
    with 6 and rank 1 with 4; moving one block gives 5 and 5."""
    costs, owner = [1.0] * 7, [0, 1, 0, 1]
    counts = balance_ranks([1, 2, 2, 2], costs, 3.0, 0.0, owner)
    assert rank_loads(counts, costs, 3.0, 0.0, owner) == [5.0, 5.0] and min(counts) >= 1
    # light dense blocks, then MoE ones, looped over 3 ranks: a block must travel several
    # stages; the brute-force optimum is 2.3
    costs, owner = [0.3] * 3 + [1.0] * 4, [0, 1, 2, 0, 1, 2]
    counts = balance_ranks(balanced_split(costs, 6, 0.2, 1.0), costs, 0.2, 1.0, owner)
    assert max(rank_loads(counts, costs, 0.2, 1.0, owner)) == pytest.approx(2.3)
    g = torch.Generator().manual_seed(7)
    for owner in ([0, 1, 1, 0], [0, 1, 2, 0, 1, 2], [0, 1, 2, 2, 1, 0]):
        costs = torch.rand(12, generator=g, dtype=torch.float64).tolist()
        first, last = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        start = balanced_split(costs, len(owner), first, last)
        refined = balance_ranks(start, costs, first, last, owner)
        assert sum(refined) == 12 and min(refined) >= 1
        assert max(rank_loads(refined, costs, first, last, owner)) <= max(
            rank_loads(start, costs, first, last, owner)
        )


def test_moe_blocks_cost_more_than_dense_ones_and_the_split_follows():
    """DeepSeek-V3 671B: 3 dense blocks, then 58 MoE blocks with 256 experts each."""
    cfg = config(**{"model.flavor": "671B", "parallelism.pp": 16})
    model = meta_model(cfg)
    costs, first, last = unit_costs(model, cfg)
    dense, moe = costs[0], costs[3]
    assert not isinstance(model.layers["0"].feed_forward, MoE)
    assert moe > 1.5 * dense  # about the same FLOPs, ~30x the parameters
    assert sum(costs) + first + last == pytest.approx(1.0)
    layout = stage_layout(model, cfg)
    assert sum(layout) == 61 and len(layout) == 16
    even = balanced_split([1.0] * 61, 16)  # split by count
    assert max(stage_costs(layout, costs, first, last)) < max(stage_costs(even, costs, first, last))
    assert layout[0] > layout[1]  # the dense blocks are cheap: the first stage takes more


def test_describe_layout_names_each_stage():
    cfg = config(**{"parallelism.pp": 2, "model.n_layers": 5})
    model = meta_model(cfg)
    text = describe_layout(model, cfg, [2, 3])
    assert re.fullmatch(
        r"stage 0: embedding \+ blocks 0-1 \(\d+%\); "
        r"stage 1: blocks 2-4 \+ head \(\d+%\)",
        text,
    ), text


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("1F1B", [[0], [1], [2], [3]]),
        ("Interleaved1F1B", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("ZBVZeroBubble", [[0, 7], [1, 6], [2, 5], [3, 4]]),
        ("DualPipeV", [[0, 7], [1, 6], [2, 5], [3, 4]]),
    ],
)
def test_stage_ids_loop_or_v(schedule, expected):
    stages = 4 if schedule == "1F1B" else 8
    assert [stage_ids(r, 4, stages, schedule) for r in range(4)] == expected


def test_split_stages_partition_the_parameters_under_their_own_names():
    cfg = config(**{"parallelism.pp": 2, "model.n_layers": 5, "model.mtp_num_layers": 1})
    layout = [1, 2, 0, 2]
    names = set(dict(meta_model(cfg).named_parameters()))
    parts = [split_stage(meta_model(cfg), layout, s) for s in range(4)]
    per_stage = [set(dict(p.named_parameters())) for p in parts]
    assert set().union(*per_stage) == names
    assert sum(map(len, per_stage)) == len(names)  # no parameter in two stages
    assert [list(p.layers.keys()) for p in parts] == [["0"], ["1", "2"], [], ["3", "4"]]
    assert [p.tok_embeddings is not None for p in parts] == [True, False, False, False]
    assert [p.output is not None for p in parts] == [False, False, False, True]
    assert [p.mtp is not None for p in parts] == [False, False, False, True]
    both = LocalStages([parts[0], parts[3]])  # a V: rank 0 holds the first and the last
    assert set(dict(both.named_parameters())) == per_stage[0] | per_stage[3]
    assert list(both.layers.keys()) == ["0", "3", "4"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"parallelism.pp": 2, "parallelism.pp_layers_per_stage": 2, "model.n_layers": 8}, 4),
        ({"parallelism.pp": 2, "parallelism.pp_layout": "1, 3", "model.n_layers": 4}, 2),
        ({"parallelism.pp": 2, "parallelism.pp_schedule": "Interleaved1F1B"}, 4),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "Interleaved1F1B",
                "parallelism.pp_stages_per_rank": 3,
                "model.n_layers": 6,
            },
            6,
        ),
    ],
)
def test_stage_count(overrides, expected):
    assert num_stages(config(**overrides)) == expected


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            {"parallelism.pp_layout": "3"},
            "parallelism.pp_layout = [3] has no effect with parallelism.pp = 1",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_layout": "1, 2", "model.n_layers": 4},
            "parallelism.pp_layout = [1, 2] must list non-negative block counts adding up to "
            "model.n_layers = 4",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_layout": "1, 1, 2", "model.n_layers": 4},
            "parallelism.pp_layout gives 3 pipeline stages, which must be parallelism.pp = 2 x",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_layout": "2, 2",
                "parallelism.pp_layers_per_stage": 2,
                "model.n_layers": 4,
            },
            "parallelism.pp_layout and parallelism.pp_layers_per_stage both set the split",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_layers_per_stage": 3, "model.n_layers": 4},
            "parallelism.pp_layers_per_stage = 3 does not divide model.n_layers = 4",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_stages_per_rank": 2},
            "parallelism.pp_schedule = '1F1B' runs 1 stage(s) per rank but the layout gives 2",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "DualPipeV",
                "parallelism.pp_stages_per_rank": 3,
                "model.n_layers": 6,
            },
            "parallelism.pp_schedule = 'DualPipeV' runs 2 stage(s) per rank but the layout gives 3",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_schedule": "Interleaved1F1B"},
            "4 pipeline stages (parallelism.pp x pp_stages_per_rank) but only model.n_layers = 3",
        ),
        (
            {"parallelism.pp": 2, "parallelism.pp_microbatches": 3},
            "parallelism.pp_microbatches = 3 must divide training.local_batch_size = 8",
        ),
        (
            {"parallelism.pp": 4, "model.n_layers": 4, "training.local_batch_size": 2},
            "parallelism.pp_schedule = '1F1B' needs at least one micro-batch per stage (4) "
            "but has 2",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "DualPipeV",
                "model.n_layers": 4,
                "training.local_batch_size": 2,
            },
            "parallelism.pp_schedule = 'DualPipeV' needs at least one micro-batch per stage "
            "(4) but has 2",
        ),
        (
            {
                "parallelism.pp": 2,
                "parallelism.pp_schedule": "Interleaved1F1B",
                "model.n_layers": 4,
                "training.local_batch_size": 5,
            },
            "rounds of parallelism.pp = 2: 5 micro-batches is not a multiple of 2 rounds",
        ),
        (
            {
                "parallelism.pp": 3,
                "parallelism.pp_layout": "2, 0, 2",
                "model.n_layers": 4,
                "training.local_batch_size": 3,
            },
            "parallelism.pp_layout = [2, 0, 2] leaves pipeline rank 1 (stages [1]) without blocks",
        ),
    ],
)
def test_bad_pipeline_keys_are_one_line_errors(overrides, fragment):
    cfg = config(**{"training.local_batch_size": 8} | overrides)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        check_pipeline(cfg)
    assert "\n" not in str(err.value)


def test_mtp_inputs_travel_with_the_hidden_state_and_need_the_labels():
    cfg = config(
        **{
            "parallelism.pp": 2,
            "model.n_layers": 2,
            "model.mtp_num_layers": 2,
            "model.dim": 64,
            "model.inter_dim": 128,
            "moe.ffn_hidden_size": 32,
            "moe.shared_expert_intermediate_size": 32,
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(cfg.model.init_std, cfg.model.n_layers)
    tokens, labels = torch.randint(0, 1000, (2, 2, 16)).unbind(0)
    first = split_stage(model, [1, 1], 0)
    packed = first(tokens, labels=labels)
    assert packed.shape == (2, 16, 3 * 64)  # hidden state, then one embedding per depth
    torch.testing.assert_close(packed[..., 64:128], model.tok_embeddings(labels))
    with pytest.raises(ValueError, match="needs the labels"):
        first(tokens)
