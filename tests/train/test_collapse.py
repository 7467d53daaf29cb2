import logging
import random

from torchmoe.config.schema import Metrics
from torchmoe.train.collapse import CollapseWatch


def loads(rng: random.Random, layers: int, experts: int, collapsed: set[int]) -> dict:
    """per_layer values as moe_stats computes them from token counts."""
    rows = []
    for layer in range(layers):
        counts = [rng.randint(50, 60) for _ in range(experts)]
        if layer in collapsed:  # two experts take every token
            counts = [0] * experts
            counts[:2] = [500, 400]
        rows.append(counts)
    mean = [sum(r) / len(r) for r in rows]
    return {
        "max_over_mean": [max(r) / m for r, m in zip(rows, mean)],
        "dead": [r.count(0) for r in rows],
    }


def test_warns_once_after_n_lines_naming_the_layer_and_the_keys(caplog):
    rng = random.Random()
    names = ["layers.1.moe", "layers.2.moe", "layers.3.moe"]
    watch = CollapseWatch(Metrics(collapse_log_lines=3), names, num_experts=16)
    with caplog.at_level(logging.WARNING):
        for step in (10, 20):
            watch.check(step, loads(rng, 3, 16, {1}))
        assert not caplog.records  # two lines in a row: not yet
        watch.check(30, loads(rng, 3, 16, {1}))
        [warning] = [r.getMessage() for r in caplog.records]
        assert warning.startswith("step 30: MoE layer layers.2.moe is collapsing: 14 of 16")
        assert "moe.load_balancing_type" in warning and "moe.enable_expert_bias" in warning
        watch.check(40, loads(rng, 3, 16, {1}))
        assert len(caplog.records) == 1  # once per episode
        watch.check(50, loads(rng, 3, 16, set()))  # recovered, then collapsed again
        for step in (60, 70, 80):
            watch.check(step, loads(rng, 3, 16, {1}))
        assert len(caplog.records) == 2


def test_healthy_routing_and_disabled_checks_stay_quiet(caplog):
    rng = random.Random()
    healthy = CollapseWatch(Metrics(collapse_log_lines=1), ["a", "b"], 8)
    off = CollapseWatch(Metrics(collapse_log_lines=0), ["a", "b"], 8)
    with caplog.at_level(logging.WARNING):
        for step in range(5):
            healthy.check(step, loads(rng, 2, 8, set()))
            off.check(step, loads(rng, 2, 8, {0, 1}))
    assert not caplog.records
