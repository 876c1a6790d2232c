"""Lightning's ``LearningRateMonitor`` that stays quiet when the run has no logger.

The configs list it so that every logged run records ``lr-<optimizer>/<param group>`` (the modules name their
parameter groups: ``lora``, ``projector``, ...); the stock callback raises when the Trainer has no logger
(``--trainer.logger false``, as in the tests), this one then does nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor


class LearningRate(LearningRateMonitor):
    """``LearningRateMonitor`` (default: logged every step) that is a no-op without a logger."""

    def __init__(self, logging_interval: Literal["step", "epoch"] | None = "step", log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum,
                         log_weight_decay=log_weight_decay)
        self._active = True

    def on_train_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)


__all__ = ["LearningRate"]
