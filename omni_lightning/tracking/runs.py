"""W&B runs: identity (offline first), runs for the jobs that are not Lightning fits (fuse, eval), media tables.

**Run identity** (shared by :class:`omni_lightning.loggers.OmniWandbLogger` and the runs below): offline unless
``WANDB_MODE`` says otherwise; run id from ``WANDB_RUN_ID``, else ``$SLURM_JOB_ID`` (a requeued job keeps its
id, so its run continues: ``resume="allow"``); group from ``WANDB_RUN_GROUP`` (the SLURM scripts set it to the
pipeline's name); x-axis ``trainer/global_step``. This module imports neither Lightning nor W&B at import time.

Nothing here touches the network unless ``WANDB_MODE=online``; offline runs land in
``<save_dir>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from omni_lightning.evaluation.examples import examples_for_model
from omni_lightning.model.config import OmniConfig
from omni_lightning.tracking.catalogue import (
    FUSE_LAYER_TABLE,
    FUSE_PLOT,
    STEP_KEY,
    eval_metric,
    examples_table,
    fuse_cosine,
    fuse_norm,
)


def model_phase(model_dir: str | os.PathLike) -> str:
    """The phase that produced a model directory, from its history: ``base`` for θ₀ (``init-model`` or the
    tiny default's stage 0), else the last step (``specialist``, ``fuse``, ``recover``, ``rehearse``)."""
    history = OmniConfig.load(model_dir).history
    step = history[-1].get("step", "base") if history else "base"
    return "base" if step in ("init-model", "pretrain") else str(step)


# ------------------------------------------------------------------------------------------ run identity
def wandb_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``$WANDB_MODE``, else ``offline`` (never online by accident)."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("online", "offline", "disabled", "shared"):
        raise ValueError(f"WANDB_MODE={mode!r}: expected online, offline or disabled")
    return mode


def run_id(explicit: str | None = None, suffix: str | None = None) -> str | None:
    """``explicit``, else ``$WANDB_RUN_ID``, else ``$SLURM_JOB_ID`` (kept across requeues), else ``None`` (W&B
    draws one); ``suffix`` tells apart several runs of one job (the models of an eval job)."""
    rid = explicit or os.environ.get("WANDB_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if rid and suffix:
        rid = f"{rid}-{suffix}"
    if rid is not None:
        rid = re.sub(r"[^A-Za-z0-9_.-]", "-", str(rid))
    return rid


def project_name(project: str | None = None) -> str:
    return project or os.environ.get("WANDB_PROJECT") or "omni-lightning"


# ------------------------------------------------------------------------------------------ plain runs
def open_run(name: str, job_type: str, save_dir: str | os.PathLike, suffix: str | None = None,
             config: dict[str, Any] | None = None, mode: str | None = None):
    """A W&B run for a job that is not a Lightning fit (fuse, eval), with the same identity rules."""
    import wandb

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project_name(), name=name, job_type=job_type, dir=str(save_dir),
                     id=run_id(suffix=suffix), resume="allow", group=os.environ.get("WANDB_RUN_GROUP"),
                     mode=wandb_mode(mode), config=config or {}, reinit="finish_previous")
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
    return run


def fuse_metrics(diag: dict[str, Any]) -> dict[str, float]:
    """Scalar diagnostics of a fusion (``diagnostics.json``) under their catalogue names."""
    tv = diag["task_vectors"]
    out: dict[str, float] = {fuse_norm(n): float(v) for n, v in tv["norm"].items()}
    names = list(tv["norm"])
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            c = tv["cosine"][a][b]
            if c is not None:
                out[fuse_cosine(a, b)] = float(c)
    return out


def log_fuse(diag: dict[str, Any], save_dir: str | os.PathLike, plot: str | os.PathLike | None = None,
             name: str = "fuse") -> str:
    """Log a fusion's diagnostics as a run (job type ``fuse``); returns the run's directory."""
    import wandb

    run = open_run(name, "fuse", save_dir, config={"method": diag.get("method"), "alpha": diag.get("alpha"),
                                                   "owners": diag.get("owners"), "record": diag.get("record")})
    try:
        rows = [[n, part, i, float(v)] for n, parts in diag["task_vectors"]["layer_norm"].items()
                for part, ys in parts.items() for i, v in enumerate(ys)]
        data: dict[str, Any] = {STEP_KEY: 0, **fuse_metrics(diag),
                                FUSE_LAYER_TABLE: wandb.Table(columns=["specialist", "part", "layer", "norm"], data=rows)}
        if plot is not None and Path(plot).is_file():
            data[FUSE_PLOT] = wandb.Image(str(plot))
        run.log(data)
        run.summary.update({"fuse/warnings": len(diag.get("warnings", []))})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def eval_metrics(phase: str, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{modality: {metric: value}}`` (``omni-lightning eval --out``) → ``{<phase>/eval/<metric>/<modality>: value}``."""
    return {eval_metric(phase, k, m): float(v) for m, res in results.items() for k, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_eval(model_dir: str | os.PathLike, results: dict[str, dict[str, Any]], save_dir: str | os.PathLike,
             data_root: str | os.PathLike | None = None, examples: int = 8, top_k: int = 3,
             examples_pool: int = 128) -> str:
    """Log one model's eval results (and a table of retrieval examples) as a run of job type ``eval``."""
    model_dir = Path(model_dir)
    phase = model_phase(model_dir)
    run = open_run(f"eval-{model_dir.name}", "eval", save_dir, suffix=f"eval-{model_dir.name}",
                   config={"model": str(model_dir), "phase": phase, "data": str(data_root)})
    try:
        run.log({STEP_KEY: 0, **eval_metrics(phase, results)})
        if examples and data_root is not None:
            rows = examples_for_model(model_dir, data_root, list(results), num_queries=examples, top_k=top_k,
                                      pool_size=max(examples_pool, top_k, examples))
            run.log({STEP_KEY: 0, **{examples_table(phase, m): wandb_table([r for r in rows if r["modality"] == m], top_k)
                                     for m in dict.fromkeys(r["modality"] for r in rows)}})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# ------------------------------------------------------------------------------------------ media
def to_media(item: dict, caption: str | None = None):
    """A decoded item as W&B media: ``wandb.Image`` (image, document, video frames side by side),
    ``wandb.Audio`` (audio) or the text itself."""
    import wandb

    kind = item.get("type")
    if kind in ("image", "document"):
        return wandb.Image(np.asarray(item["image"]), caption=caption)
    if kind == "video":
        frames = np.asarray(item["frames"])
        step = max(1, len(frames) // 8)  # at most 8 frames in the strip
        return wandb.Image(np.concatenate(list(frames[::step][:8]), axis=1), caption=caption)
    if kind == "audio":
        return wandb.Audio(np.asarray(item["waveform"], dtype=np.float32), sample_rate=int(item["sample_rate"]),
                           caption=caption)
    return item.get("text", "")


def table_columns(top_k: int) -> list[str]:
    return (["modality", "query", "target"] + [f"hit_{r}" for r in range(1, top_k + 1)]
            + ["scores", "correct_at_1", "rank_of_first_relevant"])


def wandb_table(rows: list[dict[str, Any]], top_k: int = 3):
    """The rows of :func:`retrieval_examples` (of one modality: a column holds one kind of media) as a
    ``wandb.Table``."""
    import wandb

    data = []
    for r in rows:
        hits = [to_media(h["item"], f"{'✓' if h['relevant'] else '✗'} {h['score']:.3f} · {h['text']}") for h in r["hits"]]
        hits += [None] * (top_k - len(hits))
        data.append([r["modality"], r["query"], to_media(r["target"], r["target_text"]), *hits,
                     " / ".join(f"{h['score']:.3f}" for h in r["hits"]), r["correct_at_1"],
                     r["rank_of_first_relevant"]])
    return wandb.Table(columns=table_columns(top_k), data=data)
