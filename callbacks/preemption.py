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

A signal that arrives during validation is acted on when the validation ends, and one that arrives after the
last training step (before or during the export of the model directory) when training ends, before the export:
the checkpoint then holds the finished training and the requeued job only exports. If ``scontrol requeue``
fails, the job fails loudly (:class:`RequeueFailed`, naming the job and the checkpoint to resume from).

**Periodic checkpoints** (``every_n_steps``; kill -9, an OOM kill or a node failure leave no chance to save):
the same ``hpc_ckpt_<n>.ckpt`` every N optimizer steps at the step boundary, keeping this run's newest
``keep_last``. ``every_n_steps=None`` (the default) means ``$OMNI_CHECKPOINT_EVERY`` when set (the scripts in
``slurm/`` set it), else every 500 steps for a model of at least 10^8 parameters (a real checkpoint) and off
for smaller ones (the tiny demo). ``0`` turns it off.

**Writing and resuming safely**: every checkpoint the trainer writes goes to a temporary file in the destination
folder, is fsync'ed and renamed into place (Lightning's own writer stages the file in ``$TMPDIR`` and, across
file systems, copies it over the destination: a kill then leaves a truncated newest checkpoint). When the
checkpoint a run resumes from does not load, the previous ``hpc_ckpt_<n>.ckpt`` of the same folder is used
instead, with a warning naming both.

A resumed run ends with the same weights as an uninterrupted one as long as the data stream resumes at the
saved step (the datamodule's job) — the callback also carries the RNG states (python, numpy, torch, CUDA) of
rank 0 in the checkpoint and restores them when training restarts, for dropout. When the fit completes, the
checkpoints of this run (those it wrote and those of the runs it resumed from, recorded in the checkpoints
themselves) are deleted: they hold the optimizer state (``keep_checkpoints=True`` keeps them). Checkpoints of
other runs sharing the folder are left alone.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_CKPT_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.path = int(signum), path


class RequeueFailed(RuntimeError):
    """``scontrol requeue`` failed after the preemption checkpoint was saved: the job will not come back."""


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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, rename into place, fsync the folder: a
    kill at any moment leaves either the old file or the complete new one. The temporary name holds no
    ``hpc_ckpt_`` (Lightning's resume scan would read it as a checkpoint version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        from omni_lightning.utils import readable_mode

        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    return path


def checkpoint_loads(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` loads as a checkpoint, else why not (cheap: memory-mapped, nothing copied)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exn:  # truncated zip, missing file, ...
        return f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"
    return None


def newest_loadable(directories: list[str | os.PathLike]) -> Path | None:
    """The newest (by modification time) ``hpc_ckpt_<n>.ckpt`` in ``directories`` that loads; ones that do not
    are named on stderr. ``None`` when there is none."""
    found = [p for d in directories for p in hpc_checkpoints(d)]
    for p in sorted(found, key=lambda q: q.stat().st_mtime, reverse=True):
        why = checkpoint_loads(p)
        if why is None:
            return p
        print(f"omni-lightning: checkpoint {p} does not load ({why}); trying an older one", file=sys.stderr)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with an atomic in-folder write (:func:`atomic_torch_save`) and a resume
    that falls back to the previous ``hpc_ckpt_<n>.ckpt`` of the same folder when the named one does not load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as first:
            p = Path(path)
            m = HPC_CKPT_RE.match(p.name)
            if m is None:
                raise
            older = [q for q in reversed(hpc_checkpoints(p.parent))
                     if int(HPC_CKPT_RE.match(q.name).group(1)) < int(m.group(1))]
            tried = [f"{p}: {type(first).__name__}: {first}"]
            for q in older:
                try:
                    ckpt = super().load_checkpoint(q, map_location=map_location, weights_only=weights_only)
                except Exception as exn:
                    tried.append(f"{q}: {type(exn).__name__}: {exn}")
                    continue
                rank_zero_warn(f"Preemption: checkpoint {p} does not load ({type(first).__name__}: {first}); "
                               f"resuming from the previous one, {q}")
                return ckpt
            raise RuntimeError("no checkpoint to resume from loads:\n  " + "\n  ".join(tried)) from first


class Preemption(Callback):
    """Checkpoint at a step boundary on the SLURM requeue signal or SIGTERM, requeue (SLURM), stop; optionally
    also every N steps (see the module docstring).

    Args:
        requeue: under SLURM, run ``scontrol requeue`` after saving on the requeue signal (the signal is the
            one ``SLURMEnvironment(requeue_signal=...)`` names: SIGUSR1 by default).
        keep_checkpoints: keep this run's ``hpc_ckpt_*.ckpt`` files when the fit completes.
        every_n_steps: also save a checkpoint every this many optimizer steps (``0``: never; ``None``:
            ``$OMNI_CHECKPOINT_EVERY``, else 500 for models of >= 10^8 parameters and never for smaller ones).
        keep_last: how many of this run's newest checkpoints periodic saving keeps (>= 2 keeps one to fall back
            to when the newest does not load).
    """

    REAL_MODEL_PARAMETERS = 10**8
    REAL_MODEL_EVERY = 500

    def __init__(self, requeue: bool = True, keep_checkpoints: bool = False, every_n_steps: int | None = None,
                 keep_last: int = 2) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: off); got {every_n_steps}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {keep_last}")
        self.requeue = requeue
        self.keep_checkpoints = keep_checkpoints
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._every = 0  # resolved in setup
        self._signum: int | None = None  # the requeue signal, once received
        self._requeue_signal: int | None = None
        self._previous_handler: Any = None
        self._rng: dict[str, Any] | None = None
        self._files: list[str] = []  # checkpoints of this run and of the runs it resumed from
        self.saved: Path | None = None

    # ------------------------------------------------------------------ signal
    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._signum = signum  # acted on at the end of the current training batch / validation / training

    def _resolve_every(self, pl_module: LightningModule) -> int:
        if self.every_n_steps is not None:
            return int(self.every_n_steps)
        env = os.environ.get("OMNI_CHECKPOINT_EVERY", "").strip()
        if env:
            if not env.isdigit():
                raise ValueError(f"OMNI_CHECKPOINT_EVERY={env!r}: expected a number of steps (0: off)")
            return int(env)
        n = sum(p.numel() for p in pl_module.parameters())
        return self.REAL_MODEL_EVERY if n >= self.REAL_MODEL_PARAMETERS else 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._signum = None
        self._every = self._resolve_every(pl_module)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own CheckpointIO alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
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
        if self._stop_if_signalled(trainer, "at global step"):
            return
        if self._every and trainer.global_step > 0 and trainer.global_step % self._every == 0:
            self._save(trainer)
            self._prune(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A signal received during validation (inside fit) is acted on once the validation is done."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_signalled(trainer, "during the validation after global step")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training is done; the export (the module's ``on_fit_end``) comes next. A signal received by now is
        acted on before the export: the requeued job resumes with training complete and only exports."""
        self._stop_if_signalled(trainer, "after the last training step, global step")

    def _stop_if_signalled(self, trainer: Trainer, where: str) -> bool:
        signum = self._stop_signal(trainer)
        if signum is None:
            return False
        path = self._save(trainer)
        self._mark_preempting(trainer)
        if signum == self._requeue_signal and self.requeue and trainer.is_global_zero:
            job = slurm_job_for_requeue()
            try:
                result = subprocess.call(["scontrol", "requeue", job])
            except OSError as exn:
                result = f"{type(exn).__name__}: {exn}"
            if result != 0:
                raise RequeueFailed(
                    f"Preemption: signal {signum} {where} {trainer.global_step}: saved {path}, but `scontrol requeue "
                    f"{job}` failed ({'exit ' + str(result) if isinstance(result, int) else result}): the job will not "
                    "come back by itself. Resubmit it; slurm/*.sh resume from the newest checkpoint of the phase")
            rank_zero_info(f"Preemption: signal {signum} {where} {trainer.global_step}: saved {path}; scontrol "
                           f"requeue {job} done; the requeued job resumes from it")
        else:
            how = "the requeued job resumes from it" if self._requeue_signal is not None else (
                "resume with the same command plus --ckpt_path hpc")
            rank_zero_info(f"Preemption: signal {signum} {where} {trainer.global_step}: saved {path}; {how}")
        raise Preempted(signum, str(path))

    def _save(self, trainer: Trainer) -> Path:
        path = next_hpc_path(trainer.default_root_dir)
        if trainer.world_size > 1:  # every rank must write to the same name
            path = Path(trainer.strategy.broadcast(str(path), src=0))
        self._rng = _rng_states()
        self._files.append(str(path.resolve()))
        trainer.save_checkpoint(path)  # on every rank (sharded strategies need them all); atomic rename
        self._rng = None
        self.saved = path
        return path

    def _prune(self, trainer: Trainer) -> None:
        """Periodic saving keeps this run's newest ``keep_last`` checkpoints."""
        old, self._files = self._files[:-self.keep_last], self._files[-self.keep_last:]
        if trainer.is_global_zero:
            for f in old:
                Path(f).unlink(missing_ok=True)

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
        state: dict[str, Any] = {"files": list(self._files)}
        if self._rng is not None:
            state["rng"] = self._rng
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")
        # the checkpoints of the runs this one continues: removed with this run's own when the fit completes
        self._files = [str(f) for f in state_dict.get("files", [])]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng is not None:  # resumed: continue rank 0's random streams where the checkpoint left them
            _set_rng_states(self._rng)
            self._rng = None
        ckpt = trainer.ckpt_path
        if ckpt and HPC_CKPT_RE.match(Path(ckpt).name) and str(Path(ckpt).resolve()) not in self._files:
            self._files.append(str(Path(ckpt).resolve()))  # written before the lineage was recorded

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # only reached when the stage completed (an exception skips the callbacks' teardown)
        self._restore_handler()
        if stage == "fit" and not self.keep_checkpoints and trainer.is_global_zero:
            for f in self._files:  # this run's only: concurrent runs may share default_root_dir
                Path(f).unlink(missing_ok=True)
            self._files = []


def main(argv: list[str] | None = None) -> int:
    """``python -m omni_lightning.callbacks.preemption newest DIR...``: print the newest checkpoint of the folders
    that loads (nothing when there is none); used by slurm/common.sh to resume a phase in a new job."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "newest":
        print("usage: python -m omni_lightning.callbacks.preemption newest DIR...", file=sys.stderr)
        return 2
    found = newest_loadable(args[1:])
    if found is not None:
        print(found)
    return 0


__all__ = ["AtomicCheckpointIO", "Preempted", "Preemption", "RequeueFailed", "atomic_torch_save", "checkpoint_loads",
           "hpc_checkpoints", "newest_loadable", "next_hpc_path", "slurm_job_for_requeue"]


if __name__ == "__main__":
    raise SystemExit(main())
