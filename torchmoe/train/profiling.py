"""What a step spends its time and memory on, under the job folder: a chrome trace (torch
profiler) of ``profiling.active_steps`` steps every ``profiling.freq``, on the lead rank or all,
and a CUDA memory snapshot (torch.cuda.memory) at a step and when memory runs out. Open traces in
chrome://tracing or Perfetto, snapshots at pytorch.org/memory_viz."""

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from torchmoe.config.schema import JobConfig
from torchmoe.train.ranks import is_lead

logger = logging.getLogger(__name__)


class StepProfiler:
    """``start`` before the first step, ``step(n)`` after each, ``stop`` at the end; ``oom``
    when a step ran out of CUDA memory."""

    def __init__(self, cfg: JobConfig, device: torch.device, rank: int) -> None:
        p = cfg.profiling
        self.cfg, self.device, self.rank = p, device, rank
        self.folder = Path(cfg.job.dump_folder) / p.save_folder
        traced = p.enable_profiling and (p.ranks == "all" or is_lead())
        self._snapshots = p.enable_memory_snapshot and device.type == "cuda"
        self._profiler = None
        if traced:
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(
                activities=activities,
                schedule=schedule(
                    wait=p.freq - p.warmup_steps - p.active_steps,
                    warmup=p.warmup_steps,
                    active=p.active_steps,
                ),
                on_trace_ready=self._write_trace,
            )
        self._step = 0

    def start(self, step: int) -> None:
        self._step = step
        if self._profiler is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._profiler.start()
        if self._snapshots:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def step(self, step: int) -> None:
        self._step = step
        if self._profiler is not None:
            self._profiler.step()
        if self._snapshots and step == self.cfg.memory_snapshot_step:
            self._snapshot(f"memory-step-{step}-rank{self.rank}.pickle")

    def oom(self) -> Path | None:
        """Write a snapshot of the memory at the failure (when snapshots are on)."""
        if not self._snapshots:
            return None
        return self._snapshot(f"memory-oom-step-{self._step + 1}-rank{self.rank}.pickle")

    def stop(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        if self._snapshots:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._snapshots = False

    def _snapshot(self, name: str) -> Path:
        path = self.folder / name
        torch.cuda.memory._dump_snapshot(str(path))
        logger.info("CUDA memory snapshot written to %s", path)
        return path

    def _write_trace(self, prof: profile) -> None:
        path = self.folder / f"trace-step-{self._step}-rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace of steps up to %d written to %s", self._step, path)
