"""Optional: trigger W&B syncs from compute nodes without internet, through wandb-osh.

Runs log offline (``WANDB_MODE=offline``); ``wandb-osh`` running on a login node (which has internet and sees
the same file system) uploads a run whenever it finds a command file for it. This callback writes that file
after every validation and when training ends — from global rank 0 only (wandb-osh's own Lightning hook reads
``wandb.run`` on every rank and fails on the others). Needs ``pip install wandb-osh`` (not a dependency of
omni-lightning); the SLURM scripts add it when ``OMNI_WANDB_OSH=1``.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class WandbOfflineSync(Callback):
    """Ask ``wandb-osh`` to sync the run after each validation and at the end of training (rank 0).

    Args:
        communication_dir: the folder ``wandb-osh`` watches (default: wandb-osh's, ``~/.wandb_osh_command_dir``).
    """

    def __init__(self, communication_dir: str | None = None) -> None:
        super().__init__()
        try:
            from wandb_osh.hooks import TriggerWandbSyncHook
        except ImportError as e:
            raise ImportError("WandbOfflineSync needs the wandb-osh package: `pip install wandb-osh`, then run "
                              "`wandb-osh` on a node with internet that sees this file system") from e
        self._hook = TriggerWandbSyncHook(communication_dir) if communication_dir else TriggerWandbSyncHook()
        self.triggered = 0

    def _trigger(self, trainer: Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._hook(Path(logger.experiment.dir).parent)  # run.dir is <run>/files
                self.triggered += 1

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._trigger(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trigger(trainer)


__all__ = ["WandbOfflineSync"]
