"""The model-zoo recipes plan their documented layouts under COMM_MODE=fake, every weight
sharded, within an 80 GiB GPU by the dry run's estimate."""

import re

import pytest

from tests.parallel.test_dry_run import dry_run, gib

RECIPES = [  # recipe, GPUs, the layout its header documents, the model line
    (
        "qwen3_30b_a3b",
        8,
        "8 ranks: dp_replicate 1 dp_shard 8 cp 1 tp 1 pp 1 ep 8 etp 1",
        "qwen3_moe/30B-A3B, 30.5B parameters",
    ),
    (
        "qwen3_235b_a22b",
        128,
        "128 ranks: dp_replicate 1 dp_shard 128 cp 1 tp 1 pp 1 ep 8 etp 1",
        "qwen3_moe/235B-A22B, 235.1B parameters",
    ),
    (
        "mixtral_8x22b",
        64,
        "64 ranks: dp_replicate 1 dp_shard 64 cp 1 tp 1 pp 1 ep 1 etp 8",
        "mixtral/8x22B, 140.6B parameters",
    ),
    (  # 32K tokens per sequence: context parallelism over the node
        "deepseek_v3_32k",
        8,
        "8 ranks: dp_replicate 1 dp_shard 1 cp 8 tp 1 pp 1 ep 8 etp 1",
        "deepseek_v3/16B, 15.7B parameters",
    ),
    (
        "deepseek_v2_lite",
        8,
        "8 ranks: dp_replicate 1 dp_shard 8 cp 1 tp 1 pp 1 ep 8 etp 1",
        "deepseek_v2/lite, 15.7B parameters",
    ),
]


@pytest.mark.parametrize("recipe,ngpu,layout,model", [pytest.param(*r, id=r[0]) for r in RECIPES])
def test_recipe_plans_its_layout(recipe, ngpu, layout, model):
    proc = dry_run(ngpu, "--config", f"train_configs/{recipe}.toml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert layout in out and model in out
    total = float(re.search(r"([\d.]+)B parameters", out).group(1)) * 1e9
    per_rank = gib(out, "rank 0", "params") * 2**30
    assert abs(per_rank - 4 * total / ngpu) / per_rank < 0.05  # nothing left unsharded
    assert gib(out, "rank 0", "total") < 80
