"""Samples per second of training, logged as ``<phase>/train/samples_per_sec`` (all ranks together).

Measured from the end of one training batch to the end of the next — data loading, forward, backward and
the optimizer step — and averaged over the last ``window`` batches; the clock restarts after validation so
evaluation time does not count. Under DDP every rank trains a batch of the same size per step, so the global
rate is the local one times the world size.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from omni_lightning.tracking.catalogue import samples_per_sec


def batch_size_of(batch: Any) -> int:
    """Pairs in a batch: the ``size`` of an omni-lightning batch, else the length of its first tensor."""
    if isinstance(batch, dict) and "size" in batch:
        return int(batch["size"])
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(len(first))


class Throughput(Callback):
    """Log ``<phase>/train/samples_per_sec`` every training batch (averaged over ``window`` batches).

    Args:
        window: batches averaged (the first value appears after two batches).
    """

    def __init__(self, window: int = 10) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._times: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def _restart(self) -> None:
        self._times.clear()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart()
        self._times.append((time.perf_counter(), 0))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart()
        self._times.append((time.perf_counter(), 0))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._times.append((time.perf_counter(), batch_size_of(batch) * trainer.world_size))
        if len(self._times) < 2:
            return
        elapsed = self._times[-1][0] - self._times[0][0]
        samples = sum(n for _, n in list(self._times)[1:])
        if elapsed > 0:
            pl_module.log(samples_per_sec(pl_module.phase), samples / elapsed, on_step=True, on_epoch=False,
                          batch_size=batch_size_of(batch), rank_zero_only=True)


__all__ = ["Throughput", "batch_size_of"]
