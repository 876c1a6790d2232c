"""Preemption: save a resumable checkpoint at a step boundary when the job is told to stop, then stop.

**Under SLURM** (Lightning's ``SLURMEnvironment`` with ``auto_requeue``, detected when the CLI runs under
``srun``): ``#SBATCH --signal=SIGUSR1@90`` sends SIGUSR1 to every rank 90 s before the time limit. Lightning's own
handler (``_SignalConnector._slurm_sigusr_handler_fn``) saves ``hpc_ckpt_<n>.ckpt`` *inside the signal
handler*, i.e. wherever the Python interpreter happens to be — possibly between ``optimizer.step()`` and the
loop's progress counters, or between two parameter updates — so the resumed run can replay or skip part of a
step. This callback takes the requeue signal over instead (Lightning only installs its handler when the signal
has none, and callbacks' ``setup`` runs first): the handler only raises a flag; at the end of the current
training batch every rank agrees (one max-reduce of a flag per step under DDP) and they save
``<default_root_dir>/hpc_ckpt_<n>.ckpt`` together — the point where ``ModelCheckpoint`` saves, which
Lightning restores exactly — then rank 0 runs ``scontrol requeue <job>`` and the run stops (exit status 138).
On the requeued start Lightning finds the newest ``hpc_ckpt_*.ckpt`` in ``default_root_dir`` and resumes from it
(``checkpoint_connector._parse_ckpt_path``: SLURM detected and no ``--ckpt_path`` given). The scripts in
``slurm/`` give every job its own ``default_root_dir`` (``.../job-$SLURM_JOB_ID``): a requeued job keeps its
id and finds its checkpoint; a new submission starts fresh.

SIGTERM (preemption by a higher-priority job, ``scancel``, a node going down) is handled the same way without
the requeue call: SLURM requeues preempted jobs itself.

**Outside SLURM**: SIGTERM (``kill``, a container runtime, a spot instance) saves the same
``<default_root_dir>/hpc_ckpt_<n>.ckpt`` at the end of the current batch and exits with status 143. Restart the
same command with ``--ckpt_path hpc`` (and the same ``--trainer.default_root_dir``) to resume from the newest one.

A resumed run ends with the same weights as an uninterrupted one as long as the data stream resumes at the
saved step (the datamodule's job) — the callback also carries the RNG states (python, numpy, torch, CUDA) of
rank 0 in the checkpoint and restores them when training restarts, for dropout. When the fit completes, the
run's ``hpc_ckpt_*.ckpt`` files are deleted (they hold the optimizer state; ``keep_checkpoints=True`` keeps them).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_CKPT_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.path = int(signum), path


def hpc_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """``hpc_ckpt_<n>.ckpt`` files in ``directory``, oldest (lowest n) first — the names Lightning resumes from."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := HPC_CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def next_hpc_path(directory: str | os.PathLike) -> Path:
    """Where the next preemption checkpoint goes (the numbering Lightning's ``hpc_save_path`` uses)."""
    existing = hpc_checkpoints(directory)
    n = int(HPC_CKPT_RE.match(existing[-1].name).group(1)) + 1 if existing else 1
    return Path(directory) / f"hpc_ckpt_{n}.ckpt"


def slurm_job_for_requeue() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``$SLURM_JOB_ID``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        raise RuntimeError(f"cannot requeue: SLURM_JOB_ID / SLURM_ARRAY_JOB_ID give no job id ({job!r})")
    return job


def _rng_states() -> dict[str, Any]:
    """RNG states as plain values and tensors (checkpoints are loaded with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class Preemption(Callback):
    """Checkpoint at a step boundary on the SLURM requeue signal or SIGTERM, requeue (SLURM), stop.

    Args:
        requeue: under SLURM, run ``scontrol requeue`` after saving on the requeue signal (the signal is the
            one ``SLURMEnvironment(requeue_signal=...)`` names: SIGUSR1 by default).
        keep_checkpoints: keep this run's ``hpc_ckpt_*.ckpt`` files when the fit completes.
    """

    def __init__(self, requeue: bool = True, keep_checkpoints: bool = False) -> None:
        super().__init__()
        self.requeue = requeue
        self.keep_checkpoints = keep_checkpoints
        self._signum: int | None = None  # the requeue signal, once received
        self._requeue_signal: int | None = None
        self._previous_handler: Any = None
        self._rng: dict[str, Any] | None = None
        self.saved: Path | None = None

    # ------------------------------------------------------------------ signal
    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._signum = signum  # acted on at the end of the current training batch

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._signum = None
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not on the main thread; Lightning's own SLURM requeue handler stays in place")
            return
        # Installed before Lightning registers its handlers (after setup): it then leaves this signal to us.
        self._requeue_signal = int(env.requeue_signal)
        self._previous_handler = signal.signal(self._requeue_signal, self._on_requeue_signal)

    def _restore_handler(self) -> None:
        if self._requeue_signal is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._requeue_signal, self._previous_handler or signal.SIG_DFL)
        self._requeue_signal = None

    # ------------------------------------------------------------------ the step boundary
    def _stop_signal(self, trainer: Trainer) -> int | None:
        """The signal to act on, agreed by every rank (a max-reduce), or ``None``; the requeue signal wins
        over SIGTERM when ranks saw different ones."""
        level = 2 if self._signum is not None else (1 if trainer.received_sigterm else 0)
        if trainer.world_size > 1:
            t = torch.tensor(level, device=trainer.strategy.root_device)
            level = int(trainer.strategy.reduce(t, reduce_op="max"))
        if level == 2:
            return self._requeue_signal if self._requeue_signal is not None else int(signal.SIGUSR1)
        return int(signal.SIGTERM) if level == 1 else None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self._stop_signal(trainer)
        if signum is None:
            return
        path = self._save(trainer)
        requeued = ""
        if signum == self._requeue_signal and self.requeue and trainer.is_global_zero:
            job = slurm_job_for_requeue()
            result = subprocess.call(["scontrol", "requeue", job])
            requeued = f"; scontrol requeue {job} " + ("done" if result == 0 else f"FAILED (exit {result})")
        self._mark_preempting(trainer)
        how = "the requeued job resumes from it" if self._requeue_signal is not None else (
            "resume with the same command plus --ckpt_path hpc")
        rank_zero_info(f"Preemption: signal {signum} at global step {trainer.global_step}: saved {path}{requeued}; "
                       f"{how}")
        raise Preempted(signum, str(path))

    def _save(self, trainer: Trainer) -> Path:
        path = next_hpc_path(trainer.default_root_dir)
        if trainer.world_size > 1:  # every rank must write to the same name
            path = Path(trainer.strategy.broadcast(str(path), src=0))
        self._rng = _rng_states()
        trainer.save_checkpoint(path)  # on every rank (sharded strategies need them all); atomic rename
        self.saved = path
        return path

    @staticmethod
    def _mark_preempting(trainer: Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
                mark = getattr(logger.experiment, "mark_preempting", None)
                if callable(mark):
                    mark()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """SIGTERM that Lightning acted on outside a training batch (in validation): save and exit 143."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_handler()
        if isinstance(exception, Preempted) or not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != "fit":  # validate / test: nothing to resume
            exception.code = 128 + int(signal.SIGTERM)
            return
        if trainer.sanity_checking or trainer.global_step == 0:
            exception.code = 128 + int(signal.SIGTERM)
            return
        path = self._save(trainer)
        rank_zero_info(f"Preemption: SIGTERM at global step {trainer.global_step}: saved {path}")
        exception.code = 128 + int(signal.SIGTERM)  # not a success: chained steps must not start

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng} if self._rng is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng is not None:  # resumed: continue rank 0's random streams where the checkpoint left them
            _set_rng_states(self._rng)
            self._rng = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # only reached when the stage completed (an exception skips the callbacks' teardown)
        self._restore_handler()
        if stage == "fit" and not self.keep_checkpoints and trainer.is_global_zero:
            for p in hpc_checkpoints(trainer.default_root_dir):
                p.unlink(missing_ok=True)


__all__ = ["Preempted", "Preemption", "hpc_checkpoints", "next_hpc_path", "slurm_job_for_requeue"]
