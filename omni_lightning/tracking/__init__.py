"""Weights & Biases for every phase: the metric catalogue (:mod:`.catalogue`, the one source of metric names),
runs for the jobs that are not Lightning fits (:mod:`.runs`), and the offline-run reader (:mod:`.offline`).
The Lightning logger is :class:`omni_lightning.loggers.OmniWandbLogger`."""

from omni_lightning.tracking.catalogue import (
    DRIFT_METRICS,
    EVAL_METRICS,
    FUSE_LAYER_TABLE,
    FUSE_PLOT,
    LR_REGEX,
    SECTIONS,
    STEP_KEY,
    Panel,
    drift,
    eval_metric,
    examples_table,
    fuse_cosine,
    fuse_norm,
    mix,
    panels,
    samples_per_sec,
    skipped,
    train_loss,
    val_loss,
    val_r1,
)
from omni_lightning.tracking.offline import OfflineRun, offline_runs, read_offline_run
from omni_lightning.tracking.runs import (
    eval_metrics,
    fuse_metrics,
    log_eval,
    log_fuse,
    model_phase,
    open_run,
    project_name,
    run_id,
    wandb_mode,
    wandb_table,
)

__all__ = [
    "DRIFT_METRICS", "EVAL_METRICS", "FUSE_LAYER_TABLE", "FUSE_PLOT", "LR_REGEX", "SECTIONS", "STEP_KEY",
    "OfflineRun", "Panel", "drift", "eval_metric", "eval_metrics", "examples_table", "fuse_cosine", "fuse_metrics",
    "fuse_norm", "log_eval", "log_fuse", "mix", "model_phase", "offline_runs", "open_run", "panels", "project_name",
    "read_offline_run", "run_id", "samples_per_sec", "skipped", "train_loss", "val_loss", "val_r1", "wandb_mode",
    "wandb_table",
]
