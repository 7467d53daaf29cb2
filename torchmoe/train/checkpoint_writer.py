"""Writing checkpoints so that a folder named ``step-<k>`` is always complete.

Every rank writes its shards into ``step-<k>.tmp`` (DCP); each rank then hashes its share of
the files, rank 0 writes ``manifest.json`` (manifest.py) and only then renames the folder to
``step-<k>``. A kill at any moment leaves either a complete step folder or a ``.tmp`` that the
next run removes (checkpoint.py). Pruned steps are renamed ``.deleting`` before removal, so a
half-deleted step never looks like a checkpoint.

With ``checkpoint.async_mode = "async"`` the state is staged into host memory (pinned on GPU)
and written by a background thread (``dcp.async_save``) while training goes on; the manifest
is written once every rank has written and hashed its files (``poll`` each step, ``wait``
before the next save, at the end and on preemption).
"""

import logging
import re
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlanner

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Checkpoint
from torchmoe.train import manifest
from torchmoe.train.host_stager import HostStager
from torchmoe.train.ranks import agree_max, barrier, distributed, is_lead

logger = logging.getLogger(__name__)
GiB = 2**30
_STEP = re.compile(r"^step-(0|[1-9][0-9]*)$")


def step_numbers(folder: Path) -> list[int]:
    """The steps of the ``step-<k>`` folders in ``folder``, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())


def remove_folder(path: Path) -> None:
    """Rename aside first, then delete: a kill mid-delete leaves a ``.deleting`` folder, never
    a half-empty ``step-<k>``. A symlinked step (archived elsewhere) loses only its link."""
    if path.is_symlink():
        path.unlink()
        return
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed)


class _PendingSave:
    """An async save in flight: its future, then this rank's file digests or its error."""

    def __init__(self, step: int, tmp: Path, job: dict, future: Future):
        self.step, self.tmp, self.job, self.future = step, tmp, job, future
        self.digests: dict | None = None
        self.error: OSError | None = None
        self.settled = threading.Event()
        future.add_done_callback(self._written)

    def _written(self, future: Future) -> None:
        """In the writer thread: hash this rank's share while the loop trains on."""
        try:
            if future.exception() is None:
                self.digests = manifest.digest_share(self.tmp)
        except OSError as e:
            self.error = e
        finally:
            self.settled.set()


class CheckpointWriter:
    """Saves step folders under ``folder``, pruning to ``keep_latest_k``."""

    def __init__(self, cfg: Checkpoint, folder: Path, device: torch.device):
        self.cfg, self.folder = cfg, folder
        self.checkpoint_bytes = 0  # one checkpoint's size, set by the destination check
        self.pending: _PendingSave | None = None
        self.last_saved = -1
        self.stager: HostStager | None = None
        self.group = None
        if cfg.async_mode == "async":
            self.stager = HostStager(pin_memory=device.type == "cuda")
            # the writer thread's collectives must not share a group with the loop's
            if distributed():
                self.group = dist.new_group(backend="gloo")

    def save(self, step: int, states: dict, job: dict, planner: SavePlanner | None = None) -> None:
        """Write ``states`` as ``step-<step>``; in async mode returns once they are staged.
        With a ``planner`` that makes tensors on demand (tensors_on_demand.py), one file per
        tensor and one thread, so each is released once written."""
        self.wait()
        tmp = self.folder / f"step-{step}.tmp"
        if is_lead():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        self.last_saved = step
        if self.stager is not None:
            if planner is not None:
                raise ValueError("a planner that makes tensors on demand needs a synchronous save")
            future = dcp.async_save(
                states, checkpoint_id=str(tmp), process_group=self.group, async_stager=self.stager
            )
            self.pending = _PendingSave(step, tmp, job, future)
            return
        try:
            if planner is None:
                dcp.save(states, checkpoint_id=str(tmp))
            else:
                writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1)
                dcp.save(states, storage_writer=writer, planner=planner)
        except (CheckpointException, OSError) as e:  # every rank gets DCP's gathered failure
            user_error = config_error_in(e)  # e.g. a bad tensor found while an import makes it
            if user_error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                raise user_error from None
            raise self._failed(step, tmp, e) from None
        try:
            digests, error = manifest.digest_share(tmp), None
        except OSError as e:
            digests, error = {}, e
        self._finish(step, tmp, job, digests, error)

    def poll(self) -> None:
        """Finish the async save in flight if every rank has written and hashed its files
        (call it on every rank at the same step: the ranks agree on done-ness)."""
        if self.pending is not None and agree_max([not self.pending.settled.is_set()]) == [0]:
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight is written, then finish it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except (CheckpointException, OSError) as e:
            raise self._failed(pending.step, pending.tmp, e) from None
        pending.settled.wait()
        self._finish(pending.step, pending.tmp, pending.job, pending.digests or {}, pending.error)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def _finish(
        self, step: int, tmp: Path, job: dict, digests: dict, error: OSError | None
    ) -> None:
        """Manifest, rename, prune (rank 0) once every rank's digests are in. A rank that
        could not hash its files, or a rank 0 that could not write the manifest, fails the
        save on every rank alike."""
        self._agree_or_fail(step, tmp, error, "a rank could not read back its files")
        files = manifest.gather(digests)
        final = self.folder / f"step-{step}"
        error = None
        if is_lead():
            try:
                manifest.write(tmp, step, job, files)
                if final.exists():  # the same step saved again (a seed rewritten)
                    remove_folder(final)
                tmp.rename(final)
                manifest.sync_folder(self.folder)
            except OSError as e:
                error = e
        self._agree_or_fail(step, tmp, error, "rank 0 could not write the manifest")
        if is_lead():
            logger.info("saved checkpoint %s", final)
            if self.cfg.keep_latest_k:
                self._prune(step)
        barrier()

    def _agree_or_fail(self, step: int, tmp: Path, error: OSError | None, other: str) -> None:
        if agree_max([error is not None]) != [0]:
            raise self._failed(step, tmp, error or OSError(other))

    def _prune(self, step: int) -> None:
        """Keep ``keep_latest_k`` checkpoints counting the one just saved at ``step``: remove
        only older steps, never a newer one (another history) nor the seed, step-0."""
        older = [s for s in step_numbers(self.folder) if 0 < s < step]
        for old in older[: max(0, len(older) - (self.cfg.keep_latest_k - 1))]:
            try:
                remove_folder(self.folder / f"step-{old}")
            except OSError as e:  # the run goes on; the next start clears a .deleting
                logger.warning("could not remove step-%d while pruning: %s", old, e)

    def _failed(self, step: int, tmp: Path, e: BaseException) -> ConfigError:
        """Remove the partial ``.tmp`` (the last good checkpoint stays) and say why, in one
        line: a full disk is the usual cause."""
        if is_lead():
            shutil.rmtree(tmp, ignore_errors=True)
        causes = [x for x, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        cause = next((x for x in causes if isinstance(x, OSError)), causes[0] if causes else e)
        reason = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[-1][:200]
        free = shutil.disk_usage(self.folder).free
        if free < self.checkpoint_bytes:  # torch's writer reports a full disk as a bad position
            reason = f"no space left on device: needs ~{self.checkpoint_bytes / GiB:.2f} GiB"
        last = next((f"step-{s}" for s in reversed(step_numbers(self.folder))), "none")
        return ConfigError(
            f"checkpoint step-{step} could not be written to {self.folder} ({reason}, "
            f"{free / GiB:.2f} GiB free); the last good checkpoint is {last}; free space or "
            "point checkpoint.folder elsewhere, then resume"
        )


def config_error_in(e: BaseException) -> ConfigError | None:
    """The ConfigError inside DCP's gathered failure (of any rank), if one is: it names what
    to fix, where the save's or load's own message would blame the disk or the model."""
    failures = e.failures.values() if isinstance(e, CheckpointException) else ()
    return next((f[0] for f in failures if isinstance(f[0], ConfigError)), None)
