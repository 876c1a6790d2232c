"""Weights & Biases for every phase: the metric catalogue, the logger, and runs for the non-Lightning jobs.

**The metric catalogue** (one source of truth): every name a phase logs and the dashboard shows is built by a
function here, following ``<phase>/<split>/<metric>/<modality>``. The training modules log
``<phase>/train/loss[/<modality>]``, ``<phase>/val/{loss,r1}/<modality>`` and ``<phase>/data/skipped``
(:mod:`omni_lightning.modules.base`); ``ProjectorDrift`` logs ``<phase>/drift/<metric>``; the balanced sampler
``rehearse/mix/<modality>``; the callbacks of this project ``<phase>/train/samples_per_sec`` and the tables
``<phase>/eval/examples/<modality>``; eval jobs ``<phase>/eval/<metric>/<modality>``; the fuse job ``fuse/...``.
:func:`panels` lists, per dashboard section, which of them are plotted; :mod:`omni_lightning.dashboard` turns
that into a W&B workspace and the tests check the names against what an offline run really recorded.
Phase names are the modules' ``phase``: ``specialist`` (one run per modality), ``recover``, ``rehearse``;
an evaluated model's phase is the step that produced it (``base`` for θ₀).

**Run identity** (shared by :class:`omni_lightning.loggers.OmniWandbLogger` and the runs below): offline unless
``WANDB_MODE`` says otherwise; run id from ``WANDB_RUN_ID``, else ``$SLURM_JOB_ID`` (a requeued job keeps its
id, so its run continues: ``resume="allow"``); group from ``WANDB_RUN_GROUP`` (the SLURM scripts set it to the
pipeline's name); x-axis ``trainer/global_step``. This module imports neither Lightning nor W&B at import time.

**Non-Lightning jobs** (``python -m omni_lightning.tracking``, used by ``slurm/fuse.sh`` and ``slurm/eval.sh``):

    python -m omni_lightning.tracking fuse [omni-lightning fuse arguments]   # fuse, then log diagnostics
    python -m omni_lightning.tracking eval --data ROOT --out DIR MODEL_DIR... [-- eval arguments]

Nothing here touches the network unless ``WANDB_MODE=online``; offline runs land in
``<save_dir>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------ the catalogue
STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger defines every metric against it
SPECIALISTS = ("image", "video", "document", "audio")
# the modalities each training phase logs per-modality metrics for
FIT_PHASES: dict[str, tuple[str, ...]] = {"specialist": SPECIALISTS, "recover": ("audio",), "rehearse": SPECIALISTS}
# phases of the models an eval job compares (θ₀, the specialists, fused, recovered, final)
MODEL_PHASES = ("base", "specialist", "fuse", "recover", "rehearse")
DRIFT_METRICS = ("t2a_r1", "a2t_r1", "norm_ratio", "sliced_w1")  # of ProjectorDrift (+ ref_cosine with a reference)
EVAL_METRICS = ("q2c_r1", "c2q_r1", "pool_hit1")  # plotted; every metric of an eval result is logged
LR_REGEX = r"^lr-"  # LearningRateMonitor: lr-<optimizer>/<param group name>


def train_loss(phase: str, modality: str | None = None) -> str:
    return f"{phase}/train/loss" + (f"/{modality}" if modality else "")


def val_loss(phase: str, modality: str) -> str:
    return f"{phase}/val/loss/{modality}"


def val_r1(phase: str, modality: str) -> str:
    return f"{phase}/val/r1/{modality}"


def skipped(phase: str) -> str:
    return f"{phase}/data/skipped"


def samples_per_sec(phase: str) -> str:
    return f"{phase}/train/samples_per_sec"


def drift(phase: str, metric: str) -> str:
    return f"{phase}/drift/{metric}"


def mix(phase: str, modality: str) -> str:
    return f"{phase}/mix/{modality}"


def eval_metric(phase: str, metric: str, modality: str) -> str:
    return f"{phase}/eval/{metric}/{modality}"


def examples_table(phase: str, modality: str) -> str:
    return f"{phase}/eval/examples/{modality}"


def fuse_norm(name: str) -> str:
    return f"fuse/task_vector/norm/{name}"


def fuse_cosine(a: str, b: str) -> str:
    return f"fuse/task_vector/cosine/{a}/{b}"


FUSE_LAYER_TABLE = "fuse/task_vector/layer_norm"
FUSE_PLOT = "fuse/diagnostics"


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: ``kind`` is ``line`` (against ``trainer/global_step``), ``bar``, ``table`` or
    ``media``; ``keys`` are the metric names (``regex`` selects them by pattern instead)."""

    title: str
    kind: str
    keys: tuple[str, ...] = ()
    regex: str | None = None


def panels(section: str, modalities: tuple[str, ...] | None = None, names: tuple[str, ...] = SPECIALISTS
           ) -> list[Panel]:
    """The panels of one dashboard section: a training phase (``specialist``, ``recover``, ``rehearse``),
    ``fuse``, ``eval`` or ``optimizer``. ``modalities`` narrows the per-modality panels (default: the
    phase's); ``names`` are the fused specialists' names (``fuse``)."""
    if section in FIT_PHASES:
        p, mods = section, tuple(modalities or FIT_PHASES[section])
        out = [
            Panel("train loss per modality", "line", tuple(train_loss(p, m) for m in mods)),
            Panel("val loss per modality", "line", tuple(val_loss(p, m) for m in mods)),
            Panel("val R@1 per modality", "line", tuple(val_r1(p, m) for m in mods)),
            Panel("samples/s", "line", (samples_per_sec(p),)),
            Panel("skipped samples", "line", (skipped(p),)),
        ]
        if p == "recover":
            out += [Panel("projector drift: retrieval", "line", (drift(p, "t2a_r1"), drift(p, "a2t_r1"))),
                    Panel("projector drift: audio tokens vs embedding rows", "line",
                          (drift(p, "norm_ratio"), drift(p, "sliced_w1")))]
        if p == "rehearse":
            out.append(Panel("sampler mix (share of samples)", "line", tuple(mix(p, m) for m in mods)))
        out += [Panel(f"eval {metric} per modality", "bar", tuple(eval_metric(p, metric, m) for m in mods))
                for metric in EVAL_METRICS]
        out += [Panel(f"retrieval examples: {m}", "table", (examples_table(p, m),)) for m in mods]
        return out
    if section == "fuse":
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        return [Panel("task-vector L2 norm", "bar", tuple(fuse_norm(n) for n in names)),
                Panel("task-vector cosine", "bar", tuple(fuse_cosine(a, b) for a, b in pairs)),
                Panel("per-layer task-vector norm", "table", (FUSE_LAYER_TABLE,)),
                Panel("diagnostics plot", "media", (FUSE_PLOT,))]
    if section == "eval":
        mods = tuple(modalities or SPECIALISTS)
        return [Panel(f"eval {metric}: {m} by model", "bar", tuple(eval_metric(p, metric, m) for p in MODEL_PHASES))
                for metric in EVAL_METRICS for m in mods]
    if section == "optimizer":
        return [Panel("learning rate", "line", regex=LR_REGEX)]
    raise ValueError(f"unknown dashboard section {section!r}; expected one of {SECTIONS}")


SECTIONS = (*FIT_PHASES, "fuse", "eval", "optimizer")


def model_phase(model_dir: str | os.PathLike) -> str:
    """The phase that produced a model directory, from its history: ``base`` for θ₀ (``init-model`` or the
    tiny default's stage 0), else the last step (``specialist``, ``fuse``, ``recover``, ``rehearse``)."""
    from omni_lightning.model.config import OmniConfig

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
            from omni_lightning.callbacks.retrieval_examples import examples_for_model, wandb_table

            rows = examples_for_model(model_dir, data_root, list(results), num_queries=examples, top_k=top_k,
                                      pool_size=max(examples_pool, top_k, examples))
            run.log({STEP_KEY: 0, **{examples_table(phase, m): wandb_table([r for r in rows if r["modality"] == m], top_k)
                                     for m in dict.fromkeys(r["modality"] for r in rows)}})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# ------------------------------------------------------------------------------------------ offline runs
@dataclass
class OfflineRun:
    """What an offline run file recorded: history keys, the last summary values, step-metric definitions."""

    path: Path
    run_id: str
    history_keys: set[str]
    summary: dict[str, Any]
    step_metrics: dict[str, str]  # metric name or glob -> its step metric
    config: dict[str, Any]
    artifacts: dict[str, dict[str, str]]  # artifact name -> {path in the artifact: staged local file}
    complete: bool  # the run's exit record is written (W&B writes the file from a separate process)

    def has(self, key: str) -> bool:
        """Whether the run logged ``key``: a scalar, or a table / media value (stored as ``key/_type``, ...)."""
        return key in self.history_keys or f"{key}/_type" in self.history_keys


def _records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    block, pos, partial = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            partial = chunk
            continue
        elif kind == 3:
            partial += chunk
            continue
        else:
            payload, partial = partial + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def read_offline_run(run_dir: str | os.PathLike) -> OfflineRun:
    """Read an offline run folder (``.../wandb/offline-run-<time>-<id>``) without W&B's servers."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-<id>.wandb file in {run_dir}")
    keys: set[str] = set()
    summary: dict[str, Any] = {}
    steps: dict[str, str] = {}
    config: dict[str, Any] = {}
    artifacts: dict[str, dict[str, str]] = {}
    complete = False
    rid = files[0].stem.removeprefix("run-")
    for rec in _records(files[0]):
        kind = rec.WhichOneof("record_type")
        complete = complete or kind == "exit"
        if kind == "history":
            keys.update(it.key or "/".join(it.nested_key) for it in rec.history.item)
        elif kind == "summary":
            for it in rec.summary.update:
                path = [it.key] if it.key else list(it.nested_key)
                d = summary
                for part in path[:-1]:  # a table or media value: {"_type": ..., "path": ..., ...}
                    d = d.setdefault(part, {})
                d[path[-1]] = json.loads(it.value_json)
        elif kind == "metric":
            m = rec.metric
            if m.step_metric:
                steps[m.name or m.glob_name] = m.step_metric
        elif kind == "artifact":  # e.g. the table a run logged, with its media (staged until `wandb sync`)
            artifacts[rec.artifact.name] = {e.path: e.local_path for e in rec.artifact.manifest.contents}
        elif kind in ("config", "run"):  # wandb.init(config=...) travels in the run record
            for it in (rec.config if kind == "config" else rec.run.config).update:
                config[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return OfflineRun(run_dir, rid, keys, summary, steps, config, artifacts, complete)


def offline_runs(save_dir: str | os.PathLike, wait: float = 0.0) -> list[OfflineRun]:
    """Every offline run under ``save_dir`` (searched recursively), oldest first. ``wait``: seconds to wait for
    runs that just finished until W&B's service has written their files completely."""
    deadline = time.monotonic() + wait
    while True:
        runs = [read_offline_run(d) for d in sorted(Path(save_dir).rglob("offline-run-*")) if d.is_dir()]
        if all(r.complete for r in runs) or time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ command line
def _fuse_outputs(argv: list[str]) -> tuple[Path | None, Path | None]:
    """Where ``omni-lightning fuse ARGV`` writes ``diagnostics.json`` and its plot."""
    import yaml

    from omni_lightning.cli import _parser
    from omni_lightning.fusion import DIAGNOSTICS_JSON, DIAGNOSTICS_PNG

    args = _parser().parse_args(["fuse", *argv])
    sets = dict(item.partition("=")[::2] for item in args.set)
    cfg = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    cfg = cfg or {}
    pick = lambda flag, key: flag if flag is not None else (  # noqa: E731
        yaml.safe_load(sets[key]) if key in sets else cfg.get(key))
    if pick(args.diagnose_only, "diagnose_only"):
        d = pick(args.diagnostics_dir, "diagnostics_dir")
        folder = Path(d) if d else None
    else:
        out = pick(args.out, "out")
        folder = Path(out).expanduser() if out else None
    if folder is None:
        return None, None
    return folder / DIAGNOSTICS_JSON, folder / DIAGNOSTICS_PNG


def _main_fuse(argv: list[str], save_dir: str) -> int:
    from omni_lightning.cli import main as cli_main

    diag_json, plot = _fuse_outputs(argv)  # parse first: a bad flag fails before any work
    rc = cli_main(["fuse", *argv])
    if rc != 0:
        return rc
    if diag_json is None or not diag_json.is_file():
        print("omni-lightning tracking: fuse wrote no diagnostics.json (--diagnose-only without "
              "--diagnostics-dir?); nothing to log", file=sys.stderr)
        return 0
    run_dir = log_fuse(json.loads(diag_json.read_text()), save_dir, plot)
    print(f"logged fusion diagnostics to W&B run {run_dir}")
    return 0


def _main_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from omni_lightning.cli import main as cli_main

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        model = Path(model)
        if not model.is_dir():
            print(f"omni-lightning tracking eval: error: model directory {model} does not exist", file=sys.stderr)
            return 2
        result_file = out / f"{model.name}.json"
        rc = cli_main(["eval", "--model", str(model), "--data", str(args.data), "--out", str(result_file), *extra])
        if rc != 0:
            return rc
        if not args.no_wandb:
            run_dir = log_eval(model, json.loads(result_file.read_text()), args.save_dir, args.data,
                               examples=args.examples, examples_pool=args.examples_pool)
            print(f"logged eval of {model} to W&B run {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m omni_lightning.tracking",
                                description="W&B runs for the jobs that are not Lightning fits (offline unless "
                                "WANDB_MODE says otherwise).")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuse", add_help=False, help="omni-lightning fuse, then log its diagnostics as a run",
                       description="Every argument goes to `omni-lightning fuse`.")
    f.add_argument("--wandb-dir", default=None, help="run files folder (default: $OMNI_WANDB_DIR, else runs/logs/fuse)")
    e = sub.add_parser("eval", help="omni-lightning eval of each model, then log results and examples as runs")
    e.add_argument("models", nargs="+", metavar="MODEL_DIR")
    e.add_argument("--data", required=True, help="dataset root with <modality>/<split>/ shards")
    e.add_argument("--out", required=True, help="folder for <model name>.json results")
    e.add_argument("--wandb-dir", dest="save_dir", default=None,
                   help="run files folder (default: $OMNI_WANDB_DIR, else runs/logs/eval)")
    e.add_argument("--examples", type=int, default=8, help="queries per modality in the retrieval-examples tables "
                   "(0: none)")
    e.add_argument("--examples-pool", type=int, default=128, help="candidates the example queries are ranked against "
                   "(the first samples of each modality's split)")
    e.add_argument("--no-wandb", action="store_true", help="only write the results")
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    if argv and argv[0] == "fuse":
        known, rest = f.parse_known_args(argv[1:])
        os.environ.setdefault("WANDB_MODE", "offline")
        return _main_fuse(rest + extra, known.wandb_dir or os.environ.get("OMNI_WANDB_DIR") or "runs/logs/fuse")
    args = p.parse_args(argv)
    args.save_dir = args.save_dir or os.environ.get("OMNI_WANDB_DIR") or "runs/logs/eval"
    os.environ.setdefault("WANDB_MODE", "offline")
    return _main_eval(args, extra)


__all__ = [
    "DRIFT_METRICS", "EVAL_METRICS", "FIT_PHASES", "LR_REGEX", "MODEL_PHASES", "OfflineRun", "Panel",
    "SECTIONS", "STEP_KEY", "drift", "eval_metric", "eval_metrics", "examples_table", "fuse_cosine", "fuse_metrics",
    "fuse_norm", "log_eval", "log_fuse", "mix", "model_phase", "offline_runs", "open_run", "panels", "read_offline_run", "run_id", "samples_per_sec",
    "skipped", "train_loss", "val_loss", "val_r1", "wandb_mode",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
