"""A warning when routing collapses: an MoE layer with dead experts, or one expert far above the
mean load, for several log lines in a row. Without balancing (or with too little), a few experts
can take every token while the rest stop learning; the log's counters show it, but nobody reads
counters in a week-long run."""

import logging

from torchmoe.config.schema import Metrics

logger = logging.getLogger(__name__)

BALANCING_KEYS = (
    "moe.load_balancing_type (aux_loss, seq_aux_loss, global_aux_loss) with "
    "moe.aux_loss_coeff > 0, or moe.enable_expert_bias = true with moe.bias_update_rate > 0"
)


class CollapseWatch:
    """Fed each log line's per-layer load (``moe_stats.expert_load_stats``); warns once per
    layer when the condition has held ``metrics.collapse_log_lines`` lines in a row, and again
    only after the layer recovered."""

    def __init__(self, cfg: Metrics, layer_names: list[str], num_experts: int) -> None:
        self.max_over_mean, self.dead = cfg.collapse_max_over_mean, cfg.collapse_dead_fraction
        self.lines, self.names, self.num_experts = cfg.collapse_log_lines, layer_names, num_experts
        self._streak = [0] * len(layer_names)

    def check(self, step: int, per_layer: dict) -> None:
        if not self.lines:
            return
        for i, (ratio, dead) in enumerate(zip(per_layer["max_over_mean"], per_layer["dead"])):
            bad = (self.max_over_mean and ratio > self.max_over_mean) or (
                self.dead and dead >= self.dead * self.num_experts
            )
            self._streak[i] = self._streak[i] + 1 if bad else 0
            if self._streak[i] == self.lines:
                logger.warning(
                    "step %d: MoE layer %s is collapsing: %d of %d experts got no tokens, "
                    "max/mean load %.1f, for %d log lines in a row; balance the routing: %s",
                    step,
                    self.names[i],
                    dead,
                    self.num_experts,
                    ratio,
                    self.lines,
                    BALANCING_KEYS,
                )
