"""ParallelDims: degree resolution and one test per validation error class."""

import math
import re

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.parallel_checks import check_parallel_shapes
from torchmoe.config.registry import get_model_spec
from torchmoe.config.schema import Parallelism
from torchmoe.parallel.dims import DENSE_DIMS, EXPERT_DIMS, ParallelDims


def dims_for(world, **parallelism):
    cfg = build_config({}, [(f"parallelism.{k}", str(v)) for k, v in parallelism.items()])
    return ParallelDims.from_config(cfg.parallelism, world), cfg


def test_dp_shard_takes_the_rest_and_ep_borrows_from_it():
    dims, _ = dims_for(8, dp_replicate=2, ep=2)
    assert (dims.dp_shard, dims.dp, dims.edp) == (4, 8, 2)
    assert dims.shape(DENSE_DIMS) == (1, 2, 4, 1, 1)
    assert dims.shape(EXPERT_DIMS) == (1, 2, 2, 2, 1)


def test_explicit_dp_shard_times_ep_fills_the_world():
    dims, _ = dims_for(4, dp_shard=2, ep=2)  # "FSDP2 x EP2" on 4 ranks
    assert (dims.dp_shard, dims.edp, dims.ep) == (4, 2, 2)
    dims, _ = dims_for(4, dp_shard=4, ep=2)  # the same layout, dense degree given
    assert (dims.dp_shard, dims.edp) == (4, 2)


@pytest.mark.parametrize(
    "world,parallelism,model,fragment",
    [
        (4, dict(dp_shard=3), {}, "= 3 but there are 4 ranks"),
        (6, dict(dp_replicate=4), {}, "= 4 does not divide the 6 ranks"),
        (4, dict(ep=3), {}, "parallelism.ep = 3 x parallelism.etp = 1 must divide"),
        (
            4,
            dict(ep=4),
            {"moe.num_experts": "6", "moe.router_num_groups": "0", "moe.router_group_topk": "0"},
            "moe.num_experts = 6 is not divisible",
        ),
        (2, dict(cp=2), {"training.seq_len": "34"}, "seq_len = 34 is not divisible by 2 x "),
        (
            4,
            dict(cp=2, tp=2),
            {"training.seq_len": "36"},
            "2 x parallelism.cp x parallelism.tp = 8",
        ),
        (4, dict(ep=2, etp=4), {}, "parallelism.ep = 2 x parallelism.etp = 4 must divide"),
        (4, dict(pp=3), {}, "x pp = 3 does not divide the 4 ranks"),
    ],
)
def test_validation_errors(world, parallelism, model, fragment):
    cfg = build_config(
        {}, [(f"parallelism.{k}", str(v)) for k, v in parallelism.items()] + list(model.items())
    )
    with pytest.raises(ConfigError, match=fragment):
        ParallelDims.from_config(cfg.parallelism, world)
        check_parallel_shapes(cfg, get_model_spec(cfg.model.name).heads_keys)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("model.n_heads", "3", "model.n_heads = 3 is not divisible by parallelism.tp = 2"),
        ("model.name", "mixtral", "model.n_kv_heads = 2 is not divisible by parallelism.tp = 4"),
        (
            "training.seq_len",
            "33",
            "training.seq_len = 33 is not divisible by parallelism.tp = 2 "
            "(sequence parallel splits it)",
        ),
        (
            "moe.ffn_hidden_size",
            "33",
            "moe.ffn_hidden_size = 33 is not divisible by parallelism.etp = 2",
        ),
        ("model.n_layers", "1", "model.n_layers = 1 is fewer than the parallelism.pp = 2"),
    ],
)
def test_shape_checks_come_first_and_name_both_keys(key, value, fragment):
    """Each shape is checked against the degree that splits it, naming both keys."""
    tp = 4 if value == "mixtral" else 2
    cfg = build_config(
        {},
        [(key, value), ("model.n_dense_layers", "0")]
        + [(f"parallelism.{k}", str(d)) for k, d in (("tp", tp), ("pp", 2), ("etp", 2))],
    )
    ParallelDims.from_config(cfg.parallelism, 2 * tp)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check_parallel_shapes(cfg, get_model_spec(cfg.model.name).heads_keys)


@pytest.mark.parametrize(
    "degrees,fsdp",
    [
        ({}, False),
        ({"dp_shard": 2}, True),
        ({"dp_replicate": 2}, True),
        ({"tp": 2}, True),  # FSDP on a size-1 data mesh shards the per-token modules over tp
        ({"pp": 2}, False),
        ({"pp": 2, "dp_shard": 2}, True),
        ({"ep": 2}, True),
        ({"pp": 2, "tp": 2}, True),
    ],
)
def test_one_of_autocast_or_fsdp_mixed_precision_in_every_layout(degrees, fsdp):
    """The plan applies FSDP exactly where ``fsdp_enabled`` holds, and then the trainer must not
    autocast too: bf16 compute comes from one of the two, float32 from neither."""
    p = build_config({}, [(f"parallelism.{k}", str(v)) for k, v in degrees.items()]).parallelism
    world = math.prod(degrees.values())
    dims = ParallelDims.from_config(p, world)
    assert dims.fsdp_enabled == fsdp
    assert dims.mixed_precision(torch.bfloat16) == ("fsdp" if fsdp else "autocast")
    assert dims.mixed_precision(torch.float32) == "none"


def test_the_header_shows_the_degrees_as_given_and_as_resolved():
    p = Parallelism(dp_shard=2, ep=2)
    line = ParallelDims.from_config(p, 4).describe(p)
    assert "given dp_replicate 1 dp_shard 2 cp 1 tp 1 pp 1 ep 2 etp 1;" in line
    assert (
        "data-parallel 4 (replicate 1 x dense FSDP 4), experts over ep 2 x etp 1 with FSDP 2"
        in line
    )
    auto = Parallelism(tp=2)
    assert "dp_shard -1 (the rest)" in ParallelDims.from_config(auto, 4).describe(auto)
