"""Throughput, MFU (model FLOPs: torchmoe/models/flops.py), memory and expert-load metrics,
and where they are written."""

import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from torchmoe.config.schema import JobConfig
from torchmoe.train.collapse import CollapseWatch
from torchmoe.train.metrics_file import follow_checkpoint
from torchmoe.train.moe_stats import moe_log_row
from torchmoe.train.ranks import is_lead
from torchmoe.train.wandb_run import WandbRun

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment.
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for the compute dtype, or None when unknown (e.g. CPU)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU (``memory_label``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_label(device: torch.device) -> str:
    """What ``memory_gib`` measures, for the log line."""
    return "gpu peak alloc" if device.type == "cuda" else "host peak rss"


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    tokens: int = 0
    loss: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    moe: dict[str, torch.Tensor] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m10s`` or ``42.0s``: a run's time as a person reads it."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class MetricsLogger:
    def __init__(
        self,
        cfg: JobConfig,
        flops_per_token: float,
        device: torch.device,
        dtype: torch.dtype,
        moe_layer_names: Sequence[str] = (),
    ):
        """``flops_per_token``: of the whole model (every pipeline stage); the MoE layers'
        names name a collapsing layer (collapse.py)."""
        self.cfg = cfg
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, dtype)
        self.window = Window()
        dump = Path(cfg.job.dump_folder)
        lead = is_lead()  # one writer per file
        # every rank has the same (all-reduced) loads: the lead warns
        names = list(moe_layer_names) if lead else []
        self.collapse = CollapseWatch(cfg.metrics, names, cfg.moe.num_experts)
        self.jsonl = dump / "metrics.jsonl" if cfg.metrics.save_jsonl and lead else None
        self.tb = None
        self.wandb: WandbRun | None = None  # opened by start()
        if cfg.metrics.enable_tensorboard and lead:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(dump / cfg.metrics.save_tb_folder))
        # the folder itself is made by the run's lock (folder_lock.py), with a clear error

    def start(self, resumed_step: int | None) -> None:
        """Before the first step: metrics.jsonl follows the checkpoint the run resumed from
        (``metrics_file.follow_checkpoint``; None or 0 is a fresh start), and the lead opens
        the W&B run (a resume continues the job's)."""
        if self.jsonl:
            follow_checkpoint(self.jsonl, resumed_step)
        if self.cfg.metrics.enable_wandb and is_lead():
            self.wandb = WandbRun(self.cfg, resumed=bool(resumed_step))

    def close(self) -> None:
        """Flush and close TensorBoard and W&B."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
            self.wandb = None

    def record_step(self, tokens: int, loss: float, moe: dict[str, torch.Tensor]) -> None:
        """One step's token count, loss and MoE statistics (``train.moe_stats.step_values``,
        on the device: read only when a line is logged)."""
        w = self.window
        w.steps += 1
        w.tokens += tokens
        w.loss += loss
        for key, value in moe.items():
            w.moe[key] = value if key not in w.moe else w.moe[key] + value

    def log(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        lr: float,
        bad_rows: int = 0,
        validation: dict[str, float] | None = None,
    ) -> dict:
        """One log line and metrics row: ``loss`` is the step's own; the window's mean (every
        step since the last line) is logged beside it when the window has several steps;
        ``validation`` (val_loss, val_perplexity) when it ran after this step."""
        w = self.window
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - w.start
        tps = w.tokens / elapsed
        tflops = tps * self.flops_per_token / 1e12
        total = self.cfg.training.steps
        row = {
            "step": step,
            "loss": loss,
            "loss_window_mean": w.loss / w.steps,
            "window_steps": w.steps,
            "eta_s": (total - step) * elapsed / w.steps,
            "bad_rows": bad_rows,
            "aux_loss": 0.0,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
            "memory_gib": self._peak_memory(),
        }
        if "tokens" in w.moe:
            row.update(moe_log_row(w.moe, w.steps, self.cfg.moe.capacity_factor > 0))
            if self.collapse.names:
                self.collapse.check(step, row["per_layer"])
        if "mtp_loss" in w.moe:
            row["mtp_loss"] = (w.moe["mtp_loss"] / w.steps).item()
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        mean = f" (mean of {w.steps}: {row['loss_window_mean']:.4f})" if w.steps > 1 else ""
        line = (
            f"step {step}/{total} ({100 * step // total}%) | loss {loss:.4f}{mean} | "
            f"aux {row['aux_loss']:.4f} | "
            + (f"mtp {row['mtp_loss']:.4f} | " if "mtp_loss" in row else "")
            + f"grad_norm {grad_norm:.3f} | lr {lr:.2e} | tok/s/rank {tps:,.0f} | "
            f"tflops/rank {tflops:.3g} | mfu {mfu} | "
            f"mem ({memory_label(self.device)}) {row['memory_gib']:.2f}GiB"
        )
        if "per_layer" in row:
            line += (
                f" | load max/mean {row['load_max_over_mean']:.2f} "
                f"cv {row['load_cv']:.2f} dead {row['dead_experts']} "
                f"entropy {row['router_entropy']:.2f}"
            )
        if "dropped_frac" in row:
            line += f" dropped {100 * row['dropped_frac']:.1f}%"
        if bad_rows:
            line += f" | bad rows skipped {bad_rows}"
        if validation:
            row.update(validation)
            line += (
                f" | val loss {validation['val_loss']:.4f} ppl {validation['val_perplexity']:.2f}"
            )
        line += f" | eta {duration(row['eta_s'])}"
        logger.info(line)
        self._write(row)
        self.window = Window()
        return row

    def _peak_memory(self) -> float:
        """The largest peak over ranks: pipeline stages differ (the last holds the logits)."""
        peak = torch.tensor([memory_gib(self.device)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return peak.item()

    def _write(self, row: dict) -> None:
        if self.jsonl:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if not (self.tb or self.wandb):
            return
        step, values = row["step"], scalars(row)
        if self.tb:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(values, step)


def scalars(row: dict) -> dict[str, float]:
    """A log row as TensorBoard and W&B scalars: ``train/<key>`` and, per MoE layer,
    ``moe/<key>/layer<i>``."""
    out = {f"train/{k}": v for k, v in row.items() if isinstance(v, float)}
    for key, values in row.get("per_layer", {}).items():
        if key != "tokens":
            out |= {f"moe/{key}/layer{layer}": v for layer, v in enumerate(values)}
    return out
