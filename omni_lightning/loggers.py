"""The W&B logger of omni-lightning: Lightning's ``WandbLogger`` with the project's defaults.

Offline unless ``WANDB_MODE`` says otherwise; run id from ``WANDB_RUN_ID``, else ``$SLURM_JOB_ID`` (a requeued
job keeps its id, so its run continues: Lightning passes ``resume="allow"``); group from ``WANDB_RUN_GROUP``
(the SLURM scripts set it to the pipeline's name); every metric plotted against ``trainer/global_step``
(Lightning's ``define_metric``). The configs keep ``CSVLogger`` (fast, no W&B needed); choose W&B at launch::

    omni-lightning fit --config configs/recover.yaml --trainer.logger omni_lightning.loggers.OmniWandbLogger

(the ``slurm/`` scripts do this unless ``OMNI_WANDB=0``). The CSV logger's ``name`` and ``save_dir`` carry over.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from omni_lightning.tracking.runs import project_name, run_id, wandb_mode


class OmniWandbLogger(WandbLogger):
    """``WandbLogger`` with the project's defaults (see the module docstring).

    Args:
        name: run name (e.g. ``specialist-image``).
        save_dir: folder of the run's files (``<save_dir>/wandb/offline-run-*`` offline); also where
            LightningCLI writes ``config.yaml``, so give each phase its own.
        project: W&B project (default ``$WANDB_PROJECT``, else ``omni-lightning``).
        entity: W&B entity (default: W&B's own default).
        group: run group (default ``$WANDB_RUN_GROUP``): the pipeline a run belongs to.
        job_type: the phase (``specialist``, ``recover``, ...): the dashboard groups by it.
        id: run id (default ``$WANDB_RUN_ID``, else ``$SLURM_JOB_ID``).
        tags: run tags.
        mode: ``offline`` (default unless ``$WANDB_MODE``), ``online`` or ``disabled``.
        log_model: upload checkpoints as artifacts (online only; phases hand over model directories instead).
    """

    def __init__(self, name: str | None = None, save_dir: str = "runs/logs", project: str | None = None,
                 entity: str | None = None, group: str | None = None, job_type: str | None = None,
                 id: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 log_model: bool = False) -> None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(mode)
        if log_model and mode != "online":
            raise ValueError(f"log_model needs WANDB_MODE=online (mode is {mode}); model directories are the "
                             "phases' products anyway")
        super().__init__(name=name, save_dir=save_dir, project=project_name(project), id=run_id(id),
                         log_model=log_model, entity=entity, group=group or os.environ.get("WANDB_RUN_GROUP"),
                         job_type=job_type, tags=tags, mode=mode)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning passes None, wandb warns

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Also finish the W&B run when the fit ends (successfully or not), so that a later fit in the same
        process (``omni-lightning pipeline``, tests) starts its own run instead of reusing this one."""
        super().finalize(status)
        if status in ("success", "failed") and self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


__all__ = ["OmniWandbLogger"]
