"""Test helpers for tests/test_slurm.py and tests/test_wandb.py.

:class:`SendSignal`, a test-only Lightning callback, sends this process a signal in the middle of a training step.

Used by tests/test_slurm.py through ``--trainer.callbacks+=slurm_helpers.SendSignal`` (with ``tests/`` on
``PYTHONPATH``). It fires in ``on_before_optimizer_step`` — after backward, before the weights change — so a
checkpoint written inside the signal handler would hold a half-done step; the Preemption callback must wait for
the step boundary. Settings come from the environment: ``SEND_SIGNAL`` (name, e.g. ``SIGUSR1``) and
``SEND_SIGNAL_AT_STEP`` (the global step), ``SEND_SIGNAL_RANK`` (only that global rank sends; default: every
rank), ``SEND_SIGNAL_IN`` (``train``, the default, or ``validation``: at the first validation batch once the
global step is reached, outside the sanity check); only the first attempt of a job (``SLURM_RESTART_COUNT`` 0
or unset) sends it.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback

from omni_lightning.tracking import OfflineRun, panels


class SendSignal(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.signum = getattr(signal, os.environ.get("SEND_SIGNAL", "SIGUSR1"))
        self.step = int(os.environ.get("SEND_SIGNAL_AT_STEP", "2"))
        self.rank = os.environ.get("SEND_SIGNAL_RANK")
        self.where = os.environ.get("SEND_SIGNAL_IN", "train")
        self.sent = False

    def _send(self, trainer) -> None:
        first_attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
        this_rank = self.rank is None or int(self.rank) == trainer.global_rank
        if first_attempt and this_rank and not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)  # delivered here, mid-step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.where == "train":
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.where == "validation" and not trainer.sanity_checking:
            self._send(trainer)


def assert_logged(runs: list[OfflineRun], section: str, modalities: tuple[str, ...] | None = None) -> None:
    """Every metric the dashboard section's panels name was logged by at least one of ``runs``."""
    missing = [key for p in panels(section, modalities) for key in p.keys if not any(r.has(key) for r in runs)]
    assert not missing, f"the {section} panels name metrics no run logged: {missing}"
