"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, LR schedule, data
position, RNG and step, so a resumed run continues exactly where the saved one stood.

Writing (checkpoint_writer.py) makes every ``step-<k>`` folder complete, with a manifest of
its files' checksums and of the job that saved it. Loading trusts nothing it has not checked:
leftovers of interrupted saves are cleared, the chosen step is verified against its manifest
(a damaged one is refused naming the newest good step, or skipped with ``on_corrupt =
"fallback"``), the job must match the one that saved it (fingerprint.py), and resuming an older
step while newer ones exist is refused. Model and optimizer states are keyed by parameter name
(``get_model_state_dict``), which lets DCP reshard them into other layouts. ``step-0`` is a seed
checkpoint: model weights only, written by one process, so runs of any layout start from
identical weights.
"""

import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlanner

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Checkpoint
from torchmoe.train import fingerprint, manifest, safe_dcp
from torchmoe.train.checkpoint_states import (
    RNG,
    JSONState,
    ModelAndOptimizer,
    ModelOnly,
    OldPickledState,
    TrainState,
)
from torchmoe.train.checkpoint_writer import CheckpointWriter, config_error_in, step_numbers
from torchmoe.train.ranks import barrier, distributed, is_lead
from torchmoe.train.split_experts import (
    SplitLoad,
    holds_split_experts,
    joined_names,
    joined_shapes,
)

logger = logging.getLogger(__name__)
# What one checkpoint holds per parameter: fp32 weight + AdamW's two fp32 moments.
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
GiB = 2**30

# DCP warns on every save/load without a process group; single-process use is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

__all__ = ["CheckpointManager", "TrainState", "read_model_weights"]


_LEFTOVER = re.compile(r"^step-(0|[1-9][0-9]*)\.(tmp|deleting)$")  # what a killed save leaves


def read_model_weights(step_dir: Path, option: str) -> dict[str, torch.Tensor]:
    """The model tensors of one checkpoint folder (a seed or a training step), in their saved
    dtype, without reading the optimizer or anything else; for offline tools, one process.
    ``option`` names the command-line flag that gave the folder, for the error."""
    weights = model_weights_metadata(step_dir, option)
    load_model_weights(step_dir, weights)
    return weights


def model_weights_metadata(step_dir: Path, option: str) -> dict[str, torch.Tensor]:
    """Meta tensors of the model weights one checkpoint folder holds (names, shapes, dtypes),
    after verifying the folder against its manifest; ``load_model_weights`` then reads any of
    them, a few at a time if memory is short. The folder may have been renamed; one without a
    manifest (an older torchmoe's) loads with a warning."""
    if (step_dir / manifest.MANIFEST).exists():
        _, problem = manifest.verify(step_dir, None, collective=False)
        if problem:
            raise ConfigError(f"{option} {step_dir}: the checkpoint is damaged ({problem})")
    elif _unverified(step_dir):
        logger.warning("%s %s has no manifest: its files load unverified", option, step_dir)
    try:
        saved = safe_dcp.read_metadata(step_dir).state_dict_metadata
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{option} {step_dir}: not a torchmoe checkpoint ({e}); pass a step "
            "folder such as outputs/run/checkpoint/step-100"
        ) from None
    weights = {
        key[len(_MODEL) :]: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta")
        for key, m in saved.items()
        if key.startswith(_MODEL) and isinstance(m, TensorStorageMetadata)
    }
    if not weights:
        raise ConfigError(f"{option} {step_dir}: the checkpoint holds no model weights")
    return joined_names(weights, f"{option} {step_dir}")


def load_model_weights(
    step_dir: Path, weights: dict[str, torch.Tensor], split: bool | None = None
) -> None:
    """Read the named model weights of ``step_dir`` into ``weights``, in place; meta tensors
    (``model_weights_metadata``'s) are replaced by loaded CPU tensors. ``split``: whether the
    checkpoint stores the experts' gate and up apart (split_experts.py), when the caller
    knows; else its metadata is read to find out."""
    for name, t in weights.items():
        if t.is_meta:
            weights[name] = torch.empty(t.shape, dtype=t.dtype)
    if split is None:
        split = holds_split_experts(safe_dcp.read_metadata(step_dir).state_dict_metadata)
    wanted = SplitLoad().split(weights) if split else weights
    safe_dcp.load({"train": {"model": wanted}}, step_dir)


_MODEL = "train.model."  # where CheckpointManager keeps the model, in every checkpoint


def _unverified(step_dir: Path) -> bool:
    """A folder DCP wrote without a manifest: an older torchmoe's (seeds are still usable)."""
    return not (step_dir / manifest.MANIFEST).exists() and (step_dir / ".metadata").is_file()


class CheckpointManager:
    """Saves and restores the whole training state under ``folder``. ``job`` is the job's
    fingerprint (fingerprint.job_fingerprint), written into every manifest and compared on
    load."""

    def __init__(
        self,
        cfg: Checkpoint,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        dataloader: Any,
        train_state: TrainState,
        job: dict | None = None,
        device: torch.device | None = None,
    ):
        self.cfg, self.folder, self.job = cfg, folder, job or {}
        self.model = model
        self.writer = CheckpointWriter(cfg, folder, device or torch.device("cpu"))
        self.states = {
            "train": ModelAndOptimizer(model, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": JSONState(dataloader, "data position", key=None),
            "rng": RNG(),
            "train_state": JSONState(train_state, "step"),
        }

    def saved_steps(self) -> list[int]:
        return step_numbers(self.folder)

    def load(self) -> int | None:
        """Load the requested (or latest) checkpoint; returns its step, or None for a fresh
        start when no checkpoint exists and none was asked for."""
        if not self.cfg.enable:
            return None
        self._tidy()
        steps = self.saved_steps()
        step = self.cfg.load_step
        if step == -1:
            if not steps:  # a fresh run: from the weights of another, or from scratch
                return self._initial_load() if self.cfg.initial_load_path else None
            step = steps[-1]
            if self.cfg.initial_load_path:
                logger.info(
                    "checkpoint.initial_load_path is not used: %s holds this run's step-%d",
                    self.folder,
                    step,
                )
        elif step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise ConfigError(
                f"checkpoint.load_step = {step}: no checkpoint step-{step} in "
                f"{self.folder} (saved steps: {have})"
            )
        bad: list[int] = []  # damaged steps set aside under on_corrupt = "fallback"
        if step == 0 and _unverified(self._path(0)):  # a seed an older torchmoe wrote
            logger.warning("%s has no manifest: its weights load unverified", self._path(0))
        else:
            # a seed may be a copy of any step's folder: its files count, not its step
            saved, problem = manifest.verify(self._path(step), step or None)
            if problem:
                damaged_path = self._path(step)
                step, saved, bad = self._damaged(step, problem, steps)
            self._check_job(step, saved["job"])
            if bad:  # on_corrupt = fallback, once the good step is known to fit this job
                self._move_aside(bad, "damaged")
                logger.warning(
                    "checkpoint %s is damaged (%s): moved it to %s and resuming from step-%d "
                    "(checkpoint.on_corrupt = fallback)",
                    damaged_path,
                    problem,
                    self.folder / "damaged",
                    step,
                )
        # from the listing every rank took before rank 0 moved anything (listing again races)
        self._check_lineage(step, [s for s in steps if s > step and s not in bad])
        self._restore(step)
        return step

    def _path(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    def _initial_load(self) -> int:
        """checkpoint.initial_load_path: another checkpoint's weights (and, unless
        initial_load_model_only, its optimizer moments) at step 0, checked like a seed."""
        key = "checkpoint.initial_load_path"
        path = Path(self.cfg.initial_load_path).expanduser()
        if not (path / ".metadata").is_file():
            raise ConfigError(
                f"{key} = {str(path)!r} is not a checkpoint step folder (no .metadata); give "
                "a step-N folder of a torchmoe checkpoint, e.g. one scripts/convert_hf.py wrote"
            )
        if _unverified(path):
            logger.warning("%s has no manifest: its weights load unverified", path)
        else:
            saved, problem = manifest.verify(path, None)
            if problem:
                raise ConfigError(f"{key} = {str(path)!r} is damaged ({problem}); give another")
            self._check_job(0, saved["job"], path)
        model_only = self.cfg.initial_load_model_only
        if not model_only:
            names = safe_dcp.read_metadata(path).state_dict_metadata
            if not any(k.startswith("train.optimizer.") for k in names):
                raise ConfigError(
                    f"{key} = {str(path)!r} holds no optimizer state (a seed or an import); "
                    "set checkpoint.initial_load_model_only = true"
                )
        train = ModelOnly(self.model) if model_only else self.states["train"]
        optimizer = None if model_only else self.states["train"].optimizer
        # this run's lr, weight decay, betas...: only the moments come from the other run
        settings = (
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if optimizer
            else []
        )
        self._restore(0, path, {"train": train})
        for group, own in zip(optimizer.param_groups if optimizer else [], settings):
            group.update(own)
        logger.info(
            "started from %s at step 0 (%s)",
            path,
            "weights only" if model_only else "weights and optimizer moments",
        )
        return 0

    def _restore(self, step: int, path: Path | None = None, states: dict | None = None) -> None:
        """Load ``step`` of this folder (or the checkpoint at ``path``) into ``states`` (by
        default the model of a seed, else everything not in exclude_from_loading)."""
        path = path or self._path(step)
        if states is None:
            states = (
                {"train": ModelOnly(self.model)}
                if step == 0
                else {
                    key: state
                    for key, state in self.states.items()
                    if key not in self.cfg.exclude_from_loading
                }
            )
        train = states.get("train")
        try:
            saved = safe_dcp.read_metadata(path).state_dict_metadata
            if isinstance(train, ModelAndOptimizer):
                train.flat = "train.optimizer.param_groups.0.lr" not in saved
                if "dataloader" in states:
                    self._check_data_position(path, saved)
            if isinstance(train, ModelOnly) and holds_split_experts(saved):
                train.split = self._split_load(path, train)
            safe_dcp.load(states, path)
        except OldPickledState as e:
            raise ConfigError(
                f"checkpoint {path} keeps its {e} state pickled (an older torchmoe wrote it) "
                "and torchmoe never unpickles checkpoint data; to continue from its weights, "
                "copy it to step-0 of a new checkpoint.folder (a seed: weights only)"
            ) from None
        except CheckpointException as e:  # every rank's failures, gathered
            refused = config_error_in(e)
            if refused is not None:  # safe_dcp refused an item: say that, not "does not fit"
                raise refused from None
            raise self._mismatch(path, e) from e
        except ConfigError:
            raise
        except (ValueError, RuntimeError, KeyError) as e:  # mismatches
            raise self._mismatch(path, e) from e
        finally:
            if isinstance(train, ModelOnly):
                train.split = None  # saves write the joined layout
        self.states["train"].flat = True  # new checkpoints in the current format
        if path == self._path(step):
            logger.info("%s %s", "loaded seed weights from" if step == 0 else "resumed from", path)

    @staticmethod
    def _split_load(path: Path, train: ModelOnly) -> SplitLoad:
        """Loading for a checkpoint that stores the experts' gate and up apart."""
        if isinstance(train, ModelAndOptimizer) and not train.flat:
            raise ConfigError(
                f"checkpoint {path} predates two changes of torchmoe's format (optimizer "
                "settings per parameter, joined expert gate and up) and cannot resume; to "
                "continue from its weights, copy it to step-0 of a new checkpoint.folder (a "
                "seed: weights only)"
            )
        return SplitLoad()

    def _check_data_position(self, path: Path, saved: dict) -> None:
        """Every stream this rank reads must be in the checkpoint (loader.py): else one line
        instead of DCP's missing-key error."""
        keys = self.states["dataloader"].state_dict()
        missing = [k for k in keys if f"dataloader.{k}" not in saved]
        if missing:
            raise ConfigError(
                f"checkpoint {path} has no data position for {missing[0]} (saved by an older "
                "torchmoe, with another global batch size, or from a streamed dataset at another "
                "data-parallel size); resume with the same training.global_batch_size, or set "
                "checkpoint.exclude_from_loading = ['dataloader'] to read the data afresh"
            )

    def _tidy(self) -> None:
        """Clear what interrupted saves left (rank 0; every rank waits): a ``step-<k>.tmp``
        whose manifest verifies was killed between manifest and rename and becomes
        ``step-<k>``; any other ``step-<k>.tmp`` and every ``step-<k>.deleting`` is removed.
        Nothing else in the folder is touched."""
        if is_lead() and self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                m = _LEFTOVER.match(path.name)
                if not m:
                    continue
                final = self._path(int(m[1]))
                if m[2] == "tmp" and not path.is_symlink() and not final.exists():
                    if manifest.verify(path, int(m[1]), collective=False)[1] is None:
                        path.rename(final)
                        manifest.sync_folder(self.folder)
                        logger.info("completed the interrupted save of %s", final.name)
                        continue
                if path.is_symlink() or not path.is_dir():
                    path.unlink()
                else:
                    shutil.rmtree(path)
                if m[2] == "tmp":
                    logger.info("removed %s, a save that did not finish", path.name)
        barrier()

    def _damaged(self, step: int, problem: str, steps: list[int]) -> tuple[int, dict, list[int]]:
        """``step`` failed verification: find the newest good older step. Under ``on_corrupt
        = "fallback"``, when the latest was asked for, return it with the damaged steps (the
        caller moves them into ``damaged/`` once the good step fits the job); else refuse
        naming it."""
        bad, good, saved = [step], None, None
        for older in reversed([s for s in steps if s < step]):
            saved, older_problem = manifest.verify(self._path(older), older)
            if older_problem is None:
                good = older
                break
            bad.append(older)
        path = self._path(step)
        explicit = self.cfg.load_step != -1
        if good is None:
            raise ConfigError(
                f"checkpoint {path} is damaged ({problem}) and no older checkpoint in "
                f"{self.folder} verifies; restore the files or use a new checkpoint.folder"
            )
        if explicit or self.cfg.on_corrupt == "refuse":
            fix = (
                f"--checkpoint.load_step {good} --checkpoint.discard_newer true to resume "
                "from it (newer steps move to discarded/)"
                if explicit
                else 'checkpoint.on_corrupt = "fallback" to resume from it (the damaged '
                "steps move to damaged/)"
            )
            raise ConfigError(
                f"checkpoint {path} is damaged ({problem}); the newest good checkpoint is "
                f"step-{good}: set {fix}, or restore the files"
            )
        return good, saved, bad

    def _move_aside(self, steps: list[int], into: str) -> None:
        """Move step folders into ``<folder>/<into>/`` (rank 0; every rank waits); nothing
        is deleted."""
        aside = self.folder / into
        if aside.exists() and not aside.is_dir():
            raise ConfigError(
                f"{aside} is a file; checkpoints set aside go there: move the file away"
            )
        if is_lead():
            aside.mkdir(exist_ok=True)
            for s in steps:
                target = aside / f"step-{s}"
                n = 1
                while target.exists():  # an earlier move of the same step
                    target, n = aside / f"step-{s}.{n}", n + 1
                self._path(s).rename(target)
        barrier()

    def _check_lineage(self, step: int, newer: list[int]) -> None:
        """Resuming from ``step`` while ``newer`` steps exist would leave two histories in one
        folder, and the next plain resume would pick the abandoned one: refuse, or with
        ``discard_newer`` move them to ``discarded/``."""
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
        self._move_aside(newer, "discarded")
        logger.info(
            "moved %s aside into %s (checkpoint.discard_newer)", listed, self.folder / "discarded"
        )

    def _check_job(self, step: int, saved: dict, path: Path | None = None) -> None:
        """Refuse a checkpoint another job saved (fingerprint.py), listing the differences;
        log the settings a resume may change. Step 0 (a seed, or ``path`` given) must only fit
        the model's shapes."""
        if not self.job:
            return
        saved = {**saved, "shapes": joined_shapes(saved.get("shapes", {}))}
        refused, changed = fingerprint.compare(saved, self.job)
        if step == 0:  # a seed holds weights only: its shapes are what must fit
            refused = fingerprint.compare({"shapes": saved.get("shapes", {})}, self.job)[0]
        if refused:
            fix = (
                "give checkpoint.initial_load_path a checkpoint of this model"
                if path
                else "resume with the config that saved it, or use a new checkpoint.folder"
            )
            raise ConfigError(
                f"checkpoint {path or self._path(step)} was saved by a different job "
                f"({fingerprint.summarize(refused)}); {fix}"
            )
        if changed:
            logger.info("resuming with changed settings: %s", "; ".join(changed))

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
        self._tidy()  # leftovers of killed saves take space the check must not count
        self.writer.checkpoint_bytes = n_params * CHECKPOINT_BYTES_PER_PARAM
        need = 2 * self.writer.checkpoint_bytes
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConfigError(
                f"checkpoint.folder: {folder} has {free / GiB:.2f} GiB free but two "
                f"checkpoints need ~{need / GiB:.2f} GiB; free space or point "
                "checkpoint.folder elsewhere"
            )

    def save_seed(self, planner: SavePlanner | None = None) -> None:
        """Write the freshly initialised weights as step-0 (see module docstring); a
        ``planner`` (tensors_on_demand.py) makes the model's tensors as they are written."""
        if distributed():
            raise ConfigError(
                "checkpoint.create_seed_checkpoint: run it on one rank (NGPU=1), "
                "then start the parallel run from the same checkpoint.folder"
            )
        self.writer.save(0, {"train": ModelOnly(self.model)}, self.job, planner)
        self.writer.wait()

    def maybe_save(self, step: int, last_step: int) -> None:
        """Save at every ``interval`` steps and at the last; otherwise finish an async save
        that has completed."""
        if not self.due(step, last_step):
            if self.cfg.enable:
                self.writer.poll()
            return
        self.save(step)

    def due(self, step: int, last_step: int) -> bool:
        """Whether ``maybe_save`` saves after ``step``."""
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def save(self, step: int) -> None:
        """Save the training state as ``step-<step>`` (in the background in async mode)."""
        if self.writer.last_saved != step:
            self.writer.save(step, self.states, self.job)

    def finish(self) -> None:
        """Wait for a save in flight and write its manifest (the run's end, a preemption)."""
        self.writer.wait()
        self.writer.close()

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
