"""One plain line of progress every N training steps when no progress bar is shown (SLURM jobs, the pipeline).

A job's ``.out`` file gets, on rank 0 and flushed at once::

    [specialist] step 100/400 (25%) | loss 1.2345 | 96.0 samples/s | elapsed 1m40s | ETA 5m00s

``samples/s`` counts every rank's samples since the previous line (data loading, forward, backward and the
optimizer step); the ETA extrapolates the mean time per step so far to the steps left
(``trainer.estimated_stepping_batches``). With a progress bar on screen the callback stays silent, unless
``always`` is set.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from omni_lightning.callbacks.throughput import batch_size_of
from omni_lightning.tracking.catalogue import train_loss


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLog(Callback):
    """Print ``step, loss, samples/s, ETA`` every ``every_n_steps`` optimizer steps when no progress bar is shown.

    Args:
        every_n_steps: steps between two lines (the last step always gets one).
        always: print even when a progress bar is shown.
    """

    def __init__(self, every_n_steps: int = 50, always: bool = False) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.always = always
        self.lines: list[str] = []  # what was printed (tests, and a summary on demand)

    def _active(self, trainer: Trainer) -> bool:
        return trainer.is_global_zero and (self.always or trainer.progress_bar_callback is None)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._step0 = self._step_last = trainer.global_step
        self._samples = 0
        self._printed_step = -1
        try:
            total = int(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - an unsized loader: no total, no ETA
            total = 0
        self._total = total if 0 < total < 10**12 else 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += batch_size_of(batch) * trainer.world_size
        step = trainer.global_step
        last = self._total and step >= self._total
        if step == self._printed_step or not (step % self.every_n_steps == 0 or last) or step == self._step0:
            return
        self._emit(trainer, pl_module, outputs, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step != self._printed_step and step != self._step0:
            self._emit(trainer, pl_module, None, step)

    def _emit(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, step: int) -> None:
        now = time.perf_counter()
        phase = getattr(pl_module, "phase", "train")
        parts = [f"[{phase}] step {step}" + (f"/{self._total} ({100 * step / self._total:.0f}%)" if self._total else "")]
        loss = _loss(trainer, phase, outputs)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        dt = now - self._t_last
        if dt > 0 and self._samples:
            parts.append(f"{self._samples / dt:.1f} samples/s")
        elapsed = now - self._t0
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = step - self._step0
        if self._total and done > 0:
            parts.append(f"ETA {format_duration(elapsed / done * max(0, self._total - step))}")
        line = " | ".join(parts)
        self._printed_step, self._t_last, self._samples = step, now, 0
        if self._active(trainer):
            print(line, flush=True)
            self.lines.append(line)


def _loss(trainer: Trainer, phase: str, outputs: Any) -> float | None:
    metrics = trainer.callback_metrics
    for key in (train_loss(phase), f"{train_loss(phase)}_step"):
        if key in metrics:
            return float(metrics[key])
    if isinstance(outputs, dict) and "loss" in outputs:
        return float(outputs["loss"])
    return None


__all__ = ["ProgressLog", "format_duration"]
