"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, LR schedule, data
position, RNG and step, so a resumed run continues exactly where the saved one stood.

Each checkpoint is written to ``step-<k>.tmp`` and renamed to ``step-<k>`` once complete, so a
crash mid-save never leaves a folder that looks loadable. Model and optimizer states are keyed by
parameter name (``get_model_state_dict``), which lets DCP reshard them into other layouts.
``step-0`` is a seed checkpoint: model weights only, written by one process, so runs of any
layout start from identical weights.
"""

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Checkpoint
from torchmoe.train import safe_dcp

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What one checkpoint holds per parameter: fp32 weight + AdamW's two fp32 moments.
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
GiB = 2**30

# DCP warns on every save/load without a process group; single-process use is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class _ModelOnly:
    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return {"model": get_model_state_dict(self.model)}

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd["model"])


class _ModelAndOptimizer:
    """Stateful view of model + optimizer, keyed by fully qualified parameter names. The
    optimizer's hyperparameters are flattened per parameter too: pipeline stages each hold
    some of the parameters, and one rank's param_groups would not describe the others'.
    ``flat = False`` reads checkpoints written before that (param_groups by position)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.flat = True

    def _options(self) -> StateDictOptions:
        return StateDictOptions(flatten_optimizer_state_dict=self.flat)

    def state_dict(self) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(
                self.model, self.optimizer, options=self._options()
            ),
        }

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd["model"])
        set_optimizer_state_dict(
            self.model, self.optimizer, sd["optimizer"], options=self._options()
        )


class _JSONState:
    """Stateful holder for small Python state (data position, step) saved as one JSON blob,
    since its shape (e.g. a token buffer's length) is not known before loading, and JSON so
    that loading it runs nothing (safe_dcp.py). ``key`` tells apart values that differ per
    rank (each data-parallel rank has its own data position); equal keys on several ranks are
    saved once."""

    def __init__(self, obj: Any, what: str, key: str = "blob"):
        self.obj, self.what, self.key = obj, what, key

    def state_dict(self) -> dict:
        return {self.key: json.dumps(self.obj.state_dict()).encode()}

    def load_state_dict(self, sd: dict) -> None:
        try:
            state = json.loads(sd[self.key])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _OldPickledState(self.what) from None
        self.obj.load_state_dict(state)


class _OldPickledState(Exception):
    """A checkpoint from before the JSON format keeps this state pickled: never unpickled."""


class _RNG:
    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():  # a CPU run never touches CUDA (nor may forked ranks)
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["cpu"])
        if "cuda" in sd:
            torch.cuda.set_rng_state(sd["cuda"])


class TrainState:
    """The loop's own counters."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]


def read_model_weights(step_dir: Path, option: str) -> dict[str, torch.Tensor]:
    """The model tensors of one checkpoint folder (a seed or a training step), in their saved
    dtype, without reading the optimizer or anything else; for offline tools, one process.
    ``option`` names the command-line flag that gave the folder, for the error."""
    try:
        saved = safe_dcp.read_metadata(step_dir).state_dict_metadata
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{option} {step_dir}: not a torchmoe checkpoint ({e}); pass a step "
            "folder such as outputs/run/checkpoint/step-100"
        ) from None
    prefix = "train.model."  # where CheckpointManager keeps the model, in every checkpoint
    weights = {
        key[len(prefix) :]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in saved.items()
        if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not weights:
        raise ConfigError(f"{option} {step_dir}: the checkpoint holds no model weights")
    safe_dcp.load({"train": {"model": weights}}, step_dir)
    return weights


def _is_lead() -> bool:
    """Rank 0, the one rank that renames, moves and prunes checkpoint folders."""
    return not dist.is_initialized() or dist.get_rank() == 0


class CheckpointManager:
    """Saves and restores the whole training state under ``folder``."""

    def __init__(
        self,
        cfg: Checkpoint,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        dataloader: Any,
        train_state: TrainState,
        dp_rank: int = 0,
    ):
        self.cfg, self.folder = cfg, folder
        self.checkpoint_bytes = 0  # one checkpoint's size, from check_destination
        self.model = model
        self.states = {
            "train": _ModelAndOptimizer(model, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": _JSONState(dataloader, "data position", f"dp_rank_{dp_rank}"),
            "rng": _RNG(),
            "train_state": _JSONState(train_state, "step"),
        }

    def saved_steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for p in self.folder.iterdir()
            if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        )

    def load(self) -> int | None:
        """Load the requested (or latest) checkpoint; returns its step, or None for a fresh
        start when no checkpoint exists and none was asked for."""
        if not self.cfg.enable:
            return None
        steps = self.saved_steps()
        step = self.cfg.load_step
        if step == -1:
            if not steps:
                return None
            step = steps[-1]
        elif step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise ConfigError(
                f"checkpoint.load_step = {step}: no checkpoint step-{step} in "
                f"{self.folder} (saved steps: {have})"
            )
        self._check_lineage(step, [s for s in steps if s > step])
        path = self.folder / f"step-{step}"
        states = (
            {"train": _ModelOnly(self.model)}
            if step == 0
            else {
                key: state
                for key, state in self.states.items()
                if key not in self.cfg.exclude_from_loading
            }
        )
        try:
            if step:
                saved = safe_dcp.read_metadata(path).state_dict_metadata
                self.states["train"].flat = "train.optimizer.param_groups.0.lr" not in saved
            safe_dcp.load(states, path)
        except _OldPickledState as e:
            raise ConfigError(
                f"checkpoint {path} keeps its {e} state pickled (an older torchmoe wrote it) "
                "and torchmoe never unpickles checkpoint data; to continue from its weights, "
                "copy it to step-0 of a new checkpoint.folder (a seed: weights only)"
            ) from None
        except CheckpointException as e:  # every rank's failures, gathered
            refused = [x for x, _ in e.failures.values() if isinstance(x, ConfigError)]
            if refused:  # safe_dcp refused an item: say that, not "does not fit"
                raise refused[0] from None
            raise self._mismatch(path, e) from e
        except ConfigError:
            raise
        except (ValueError, RuntimeError, KeyError) as e:  # mismatches
            raise self._mismatch(path, e) from e
        self.states["train"].flat = True  # new checkpoints in the current format
        logger.info("%s %s", "loaded seed weights from" if step == 0 else "resumed from", path)
        return step

    def _check_lineage(self, step: int, newer: list[int]) -> None:
        """Resuming from ``step`` while ``newer`` steps exist would leave two histories in one
        folder, and the next plain resume would pick the abandoned one: refuse, or with
        ``discard_newer`` move them to ``discarded/`` (rank 0; every rank waits)."""
        if not newer:
            return
        listed = ", ".join(f"step-{s}" for s in newer)
        if not self.cfg.discard_newer:
            raise ConfigError(
                f"checkpoint.load_step = {step}: {self.folder} holds newer checkpoints "
                f"({listed}) that a resume from it would abandon; resume the latest (drop "
                "load_step), use another checkpoint.folder, or set checkpoint.discard_newer "
                "= true to move them aside"
            )
        if _is_lead():
            aside = self.folder / "discarded"
            aside.mkdir(exist_ok=True)
            for s in newer:
                target = aside / f"step-{s}"
                n = 1
                while target.exists():  # an earlier discard of the same step
                    target, n = aside / f"step-{s}.{n}", n + 1
                (self.folder / f"step-{s}").rename(target)
            logger.info("moved %s aside into %s (checkpoint.discard_newer)", listed, aside)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def check_destination(self, n_params: int) -> None:
        """Before the first step: the folder is a folder, writable, with room for two
        checkpoints (the one being written and the last good one) of ``n_params``
        parameters; otherwise one line with the path and the fix."""
        if not self.cfg.enable:
            return
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"checkpoint.folder: {folder} is a file, not a folder; point "
                "job.dump_folder or checkpoint.folder elsewhere"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"checkpoint.folder: cannot write to {folder} ({e.strerror or e}); point "
                "job.dump_folder or checkpoint.folder at a writable folder"
            ) from None
        self.checkpoint_bytes = n_params * CHECKPOINT_BYTES_PER_PARAM
        need = 2 * self.checkpoint_bytes
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConfigError(
                f"checkpoint.folder: {folder} has {free / GiB:.2f} GiB free but two "
                f"checkpoints need ~{need / GiB:.2f} GiB; free space or point "
                "checkpoint.folder elsewhere"
            )

    def save_seed(self) -> None:
        """Write the freshly initialised weights as step-0 (see module docstring)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "checkpoint.create_seed_checkpoint: run it on one rank (NGPU=1), "
                "then start the parallel run from the same checkpoint.folder"
            )
        self._save(0, {"train": _ModelOnly(self.model)})

    def maybe_save(self, step: int, last_step: int) -> None:
        if not self.cfg.enable or (step % self.cfg.interval and step != last_step):
            return
        self._save(step, self.states)

    def _save(self, step: int, states: dict) -> None:
        """All ranks write their shards into ``.tmp``; rank 0 renames and prunes after all are
        done."""
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        lead = _is_lead()
        final = self.folder / f"step-{step}"
        tmp = self.folder / f"step-{step}.tmp"
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        if distributed:
            dist.barrier()
        try:
            dcp.save(states, checkpoint_id=str(tmp))
        except (CheckpointException, OSError) as e:  # every rank gets DCP's gathered failure
            raise self._save_failed(step, tmp, e) from None
        if distributed:
            dist.barrier()
        if lead:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            logger.info("saved checkpoint %s", final)
            if self.cfg.keep_latest_k:
                self._prune(step)
        if distributed:
            dist.barrier()

    def _prune(self, step: int) -> None:
        """Keep ``keep_latest_k`` checkpoints counting the one just saved at ``step``: remove
        only older steps, never a newer one (another history) nor the seed, step-0."""
        older = [s for s in self.saved_steps() if 0 < s < step]
        for old in older[: max(0, len(older) - (self.cfg.keep_latest_k - 1))]:
            shutil.rmtree(self.folder / f"step-{old}")

    @staticmethod
    def _mismatch(path: Path, e: BaseException) -> ConfigError:
        """A checkpoint that fails to load into this job: one line with DCP's reason."""
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = lines[-1] if isinstance(e, CheckpointException) else lines[0]
        return ConfigError(
            f"checkpoint {path} does not fit this job ({reason[:200]}); "
            "resume with the config that saved it, or use a new "
            "checkpoint.folder"
        )

    def _save_failed(self, step: int, tmp: Path, e: BaseException) -> ConfigError:
        """Remove the partial ``.tmp`` (the last good checkpoint stays) and say why, in one
        line: a full disk is the usual cause."""
        if _is_lead():
            shutil.rmtree(tmp, ignore_errors=True)
        causes = [x for x, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        cause = next((x for x in causes if isinstance(x, OSError)), causes[0] if causes else e)
        reason = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[-1][:200]
        free = shutil.disk_usage(self.folder).free
        if free < self.checkpoint_bytes:  # torch's writer reports a full disk as a bad position
            reason = f"no space left on device: needs ~{self.checkpoint_bytes / GiB:.2f} GiB"
        last = next((f"step-{s}" for s in reversed(self.saved_steps())), "none")
        return ConfigError(
            f"checkpoint step-{step} could not be written to {self.folder} ({reason}, "
            f"{free / GiB:.2f} GiB free); the last good checkpoint is {last}; free space or "
            "point checkpoint.folder elsewhere, then resume"
        )
