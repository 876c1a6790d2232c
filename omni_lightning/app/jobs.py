"""Jobs that are not Lightning fits, logged as W&B runs (offline unless ``WANDB_MODE`` says otherwise):

    omni-lightning jobs fuse [fuse options] [--wandb_dir DIR]      # fuse, then log the diagnostics as a run
    omni-lightning jobs eval --models DIR... --data ROOT --out DIR [eval options] [--wandb_dir DIR]

``slurm/fuse.sh`` and ``slurm/eval.sh`` run them. The options are those of ``omni-lightning fuse`` / ``eval``
plus the ones added here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from jsonargparse import ArgumentParser

from omni_lightning.fusion import DIAGNOSTICS_JSON, DIAGNOSTICS_PNG, FuseConfig, run_cli
from omni_lightning.tracking.runs import log_eval, log_fuse

FUSE_JOB_KEYS = ("wandb_dir",)


def _wandb_dir(given: str | None, job: str) -> str:
    return given or os.environ.get("OMNI_WANDB_DIR") or f"runs/logs/{job}"


def add_fuse_arguments(p: ArgumentParser) -> None:
    p.add_argument("--wandb_dir", type=str | None, default=None,
                   help="run files folder (default: $OMNI_WANDB_DIR, else runs/logs/fuse)")


def add_eval_arguments(p: ArgumentParser) -> None:
    p.add_argument("--models", type=list[str], required=True, help="model directories to evaluate")
    p.add_argument("--out", type=str, required=True, help="folder for <model name>.json results")
    p.add_argument("--wandb_dir", type=str | None, default=None,
                   help="run files folder (default: $OMNI_WANDB_DIR, else runs/logs/eval)")
    p.add_argument("--examples", type=int, default=8, help="queries per modality in the retrieval-examples tables (0: none)")
    p.add_argument("--examples_pool", type=int, default=128,
                   help="candidates the example queries are ranked against (the first samples of each modality's split)")
    p.add_argument("--wandb", type=bool, default=True, help="log to W&B (false: only write the results)")


def diagnostics_files(cfg: FuseConfig) -> tuple[Path | None, Path | None]:
    """Where a fuse with ``cfg`` writes ``diagnostics.json`` and its plot (``None``: nowhere)."""
    folder = cfg.diagnostics_dir if cfg.diagnose_only else cfg.out
    if not folder:
        return None, None
    folder = Path(folder).expanduser()
    return folder / DIAGNOSTICS_JSON, folder / DIAGNOSTICS_PNG


def fuse_job(cfg: FuseConfig, wandb_dir: str | None = None) -> int:
    diag_json, plot = diagnostics_files(cfg)
    rc = run_cli(cfg)
    if rc != 0:
        return rc
    if diag_json is None or not diag_json.is_file():
        print("omni-lightning jobs fuse: fuse wrote no diagnostics.json (--diagnose_only without "
              "--diagnostics_dir?); nothing to log", file=sys.stderr)
        return 0
    run_dir = log_fuse(json.loads(diag_json.read_text()), _wandb_dir(wandb_dir, "fuse"), plot)
    print(f"logged fusion diagnostics to W&B run {run_dir}")
    return 0


def eval_job(evaluate: Callable[..., int], models: list[str], data: str, out: str, wandb_dir: str | None = None,
             examples: int = 8, examples_pool: int = 128, wandb: bool = True, **eval_options) -> int:
    """``evaluate`` (the ``eval`` subcommand) of each model into ``out/<model name>.json``, each logged as a run."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for model in map(Path, models):
        if not model.is_dir():
            raise FileNotFoundError(f"model directory {model} does not exist")
        result_file = folder / f"{model.name}.json"
        rc = evaluate(str(model), data, out=str(result_file), **eval_options)
        if rc != 0:
            return rc
        if wandb:
            run_dir = log_eval(model, json.loads(result_file.read_text()), _wandb_dir(wandb_dir, "eval"), data,
                               examples=examples, examples_pool=examples_pool)
            print(f"logged eval of {model} to W&B run {run_dir}")
    return 0
