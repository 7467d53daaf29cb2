"""Weights & Biases logging: the same scalars as TensorBoard, the resolved config, and one W&B
run per job that a resume continues. ``wandb`` is imported only when enabled; with
``WANDB_MODE=offline`` it writes under job.dump_folder/wandb for a later ``wandb sync``."""

import dataclasses
import os
from pathlib import Path
from typing import Any

from torchmoe.config.errors import ConfigError, first_line
from torchmoe.config.schema import JobConfig

RUN_ID_FILE = "wandb_run_id"


class WandbRun:
    """The job's W&B run. A resumed job (``resumed``) continues the run whose id the folder
    recorded; a fresh one starts a new run and records its id."""

    def __init__(self, cfg: JobConfig, resumed: bool) -> None:
        import wandb

        m, dump = cfg.metrics, Path(cfg.job.dump_folder)
        id_file = dump / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        try:
            self._run = wandb.init(
                project=m.wandb_project,
                name=m.wandb_run_name or dump.resolve().name,
                tags=list(m.wandb_tags),
                config=dataclasses.asdict(cfg),
                dir=str(dump),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as e:  # wandb.errors.UsageError (no login), CommError (no network)
            raise ConfigError(
                f"metrics.enable_wandb: W&B could not start ({first_line(e, 160)}); run "
                "`wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to sync later"
            ) from None
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(self._run.id + "\n")
        os.replace(tmp, id_file)

    def log(self, scalars: dict[str, Any], step: int) -> None:
        self._run.log(scalars, step=step)

    def finish(self) -> None:
        self._run.finish()
