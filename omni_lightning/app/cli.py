"""``omni-lightning`` — the command line: one jsonargparse surface.

LightningCLI owns the training subcommands (``fit``, ``validate``, ``test``, ``predict``; see
:mod:`omni_lightning.app.fit`). Every other subcommand's options come from one declaration — the signature of
its function below, or the config dataclass it runs (``fuse``: :class:`~omni_lightning.fusion.FuseConfig`,
``pipeline``: :class:`~omni_lightning.app.pipeline.PipelineConfig`) — so each subcommand takes
``--config FILE`` (a YAML of its own options) and ``--print_config``:

    omni-lightning fit --config configs/specialist/image.yaml
    omni-lightning init-model --preset tiny --out runs/base
    omni-lightning make-demo-data --out runs/data
    omni-lightning shard --manifest pairs.jsonl --modality image --split train --out runs/data
    omni-lightning eval --model runs/image --data runs/data [--out results.json]
    omni-lightning fuse --config configs/fuse.yaml [--method ties --ties.density 0.2] [--diagnose_only]
    omni-lightning drift --model runs/demo/fused runs/demo/recovered --data runs/demo/data
    omni-lightning pipeline --config configs/pipeline.yaml --out runs/demo
    omni-lightning demo --out runs/demo          (the same, with the shipped configs/pipeline.yaml)
    omni-lightning dashboard --entity ENT --project PROJ --dry_run
    omni-lightning jobs fuse|eval ...            (fuse / eval, logged as W&B runs; used by slurm/)

Options are spelled as the Python names (``--batch_size``); the shell habits ``--batch-size``, a bare
boolean flag (``--overwrite``), ``--no-progress`` and several values after a list option
(``--modalities image audio``) are accepted too.
"""

from __future__ import annotations

import json
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from omni_lightning.app import jobs
from omni_lightning.app.dashboard import DEFAULT_NAME, run_dashboard
from omni_lightning.app.fit import LIGHTNING_SUBCOMMANDS, lightning_cli
from omni_lightning.app.grid import GridConfig, grid_markdown, run_grid
from omni_lightning.app.pipeline import PipelineConfig, config_path, run_pipeline
from omni_lightning.app.pipeline import parser as pipeline_parser
from omni_lightning.data.shards import shard_manifest
from omni_lightning.demo import demo_vocabulary
from omni_lightning.demo import make_demo_data as make
from omni_lightning.evaluation import evaluate_model, format_metrics
from omni_lightning.evaluation.drift import format_drift, load_pairs, measure_drift
from omni_lightning.fusion import FuseConfig, FusionError, run_cli
from omni_lightning.model.build import init_model as build
from omni_lightning.model.omni import load_model_and_processor
from omni_lightning.utils import atomic_write_text


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", message=".*Found .* module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within.*")
    # our IterableDatasets yield exactly len() batches per rank (see data/datamodule.py)
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    # retrieval metrics are synced by torchmetrics in compute(), not by self.log
    warnings.filterwarnings("ignore", message=".*It is recommended to use `self.log\\('[a-z]+/val/r1/.*")


# ---------------------------------------------------------------------------------------------- subcommands
def init_model(out: str, preset: Literal["tiny", "small"] = "tiny", backbone: str | None = None,
               audio_encoder: str | None = None, seed: int = 0,
               dtype: Literal["float32", "bfloat16", "float16"] | None = None, overwrite: bool = False,
               prompt_format: Literal["template", "chat"] | None = None) -> int:
    """Write a model directory: an embedded preset, or an assembly of local checkpoints.

    Args:
        out: model directory to write.
        preset: embedded preset (tiny: the default; small: ~30 M parameters), tokenizer trained on the demo world.
        backbone: local Qwen3-VL / Qwen2-VL / Qwen2.5-VL checkpoint directory.
        audio_encoder: local Qwen3-Omni / Qwen3-Omni audio encoder / Whisper checkpoint directory.
        seed: seed of the random weights.
        dtype: dtype of assembled weights.
        overwrite: replace an existing directory.
        prompt_format: chat (the backbone's chat template) or template (ours); default: chat when an assembled
            backbone ships a chat template, else template.
    """
    vocabulary = None if backbone or audio_encoder else demo_vocabulary()
    path = build(out, preset=preset, backbone=backbone, audio_encoder=audio_encoder, seed=seed, overwrite=overwrite,
                 dtype=dtype, vocabulary=vocabulary, prompt_format=prompt_format)
    print(f"wrote model directory {path}")
    return 0


def make_demo_data(out: str, seed: int = 0, n_train: int | None = None, n_eval: int | None = None,
                   modalities: list[str] | None = None, corpus: Literal["recipe", "pretrain"] = "recipe",
                   overwrite: bool = False) -> int:
    """Write the deterministic demo corpus (webdataset shards).

    Args:
        out: dataset root to write.
        seed: corpus seed.
        n_train: train pairs per modality (default: the corpus's).
        n_eval: eval pairs per modality (default: the corpus's).
        modalities: modalities to write (default: all of the corpus's).
        corpus: recipe: the five modalities' pairs; pretrain: the stage-0 corpus.
        overwrite: replace existing shard sets.
    """
    kwargs = {k: v for k, v in (("n_train", n_train), ("n_eval", n_eval), ("modalities", modalities)) if v is not None}
    print(json.dumps(make(out, seed=seed, overwrite=overwrite, corpus=corpus, **kwargs), indent=2, default=str))
    return 0


def shard(manifest: str, out: str, modality: str, split: str = "train", max_per_shard: int = 1000,
          overwrite: bool = False, allow_outside: bool = False) -> int:
    """Turn a JSONL manifest of pairs into webdataset shards.

    Args:
        manifest: the JSONL manifest (one pair per line; media as paths relative to it).
        out: dataset root; shards go to OUT/<modality>/<split>/.
        modality: the pairs' modality.
        split: split name.
        max_per_shard: samples per shard.
        overwrite: replace an existing shard set.
        allow_outside: accept media paths that are absolute or leave the manifest's folder (../).
    """
    written = shard_manifest(manifest, out, modality, split, max_per_shard=max_per_shard, overwrite=overwrite,
                             allow_outside=allow_outside)
    print(f"wrote shards to {written}")
    return 0


def evaluate(model: str, data: str, modalities: list[str] | None = None, split: str = "eval", batch_size: int = 64,
             max_samples: int | None = None, pool_size: int = 100, query_chunk: int = 1024, cand_chunk: int = 16384,
             progress: bool = True, out: str | None = None) -> int:
    """Retrieval metrics (both directions), pool Hit@1 and zero-shot accuracy of a model on eval shards, per modality.

    Args:
        model: model directory.
        data: dataset root (with <modality>/<split>/ shards).
        modalities: default: every modality with shards.
        split: split to evaluate.
        batch_size: items per encoder forward.
        max_samples: evaluate the first N samples per modality.
        pool_size: candidates per query for MMEB-style Hit@1.
        query_chunk: queries scored at once (bounds memory).
        cand_chunk: candidates scored at once (bounds memory).
        progress: show progress bars.
        out: write results as JSON here.
    """
    results = evaluate_model(model, data, modalities=modalities, split=split, batch_size=batch_size, progress=progress,
                             max_samples=max_samples, pool_size=pool_size, query_chunk=query_chunk,
                             cand_chunk=cand_chunk)
    print(f"{model} on {data} ({split}):")
    print(format_metrics(results))
    if out:
        atomic_write_text(out, json.dumps(results, indent=2))
    return 0


def drift(model: list[str], data: str, reference: str | None = None, split: str = "eval", max_samples: int = 256,
          batch_size: int = 64, out: str | None = None) -> int:
    """Projector drift of models on audio–text eval pairs (vs an optional reference).

    Args:
        model: model directories (one row each).
        data: dataset root (with audio/<split>/ shards).
        reference: reference model directory, e.g. the audio specialist.
        split: split to read.
        max_samples: pairs measured (the first of the split).
        batch_size: encoding batch size.
        out: write results as JSON here.
    """
    samples = load_pairs(data, split, max_samples)
    ref = load_model_and_processor(reference) if reference else (None, None)
    rows = {}
    for m in model:
        embedder, processor = load_model_and_processor(m)
        rows[Path(m).name] = measure_drift(embedder, processor, samples, ref[0], ref[1], batch_size)
    print(format_drift(rows))
    if out:
        atomic_write_text(out, json.dumps(rows, indent=2))
    return 0


def demo(out: str = "runs/demo", force: str = "") -> int:
    """The main job (`make demo`): the pipeline with the shipped configs/pipeline.yaml.

    Args:
        out: output folder.
        force: comma-separated stages to redo (see `omni-lightning pipeline --help`).
    """
    return run_pipeline(["--config", str(config_path("pipeline.yaml")), "--out", out, "--force", force])


def dashboard(entity: str, project: str, name: str = DEFAULT_NAME, sections: list[str] | None = None,
              dry_run: bool = False, json: bool = False) -> int:
    """Build the W&B workspace (a section per phase) with wandb-workspaces. Saving needs WANDB_MODE=online and a
    W&B API key; --dry_run prints the workspace without network.

    Args:
        entity: W&B entity (team or user) the runs log to.
        project: W&B project (the runs' WANDB_PROJECT).
        name: view name.
        sections: sections to build (default: all).
        dry_run: print the workspace instead of saving it (no network).
        json: with --dry_run: print the full view spec as JSON.
    """
    return run_dashboard(entity, project, name, sections, dry_run, as_json=json)


def export(model: str, out: str, backbone_only: bool = False, eval_results: str | None = None,
           overwrite: bool = False) -> int:
    """Write a shareable folder: AutoModel / AutoProcessor (after `import omni_lightning.model`) and
    SentenceTransformer open it; with --backbone_only, the language+vision backbone as a plain checkpoint of its
    own architecture. Every folder gets a model card (README.md: recipe, input hashes, eval table).

    Args:
        model: model directory to export.
        out: folder to write.
        backbone_only: write only the language+vision backbone (e.g. a Qwen3VLModel checkpoint) and its processor.
        eval_results: a JSON of `omni-lightning eval --out`: its table goes into the model card.
        overwrite: replace --out if it exists.
    """
    from omni_lightning.model.export import export_model

    path = export_model(model, out, backbone_only=backbone_only, eval_results=eval_results, overwrite=overwrite)
    print(f"exported {model} to {path}" + (" (backbone only)" if backbone_only else ""))
    return 0


def fuse(cfg: FuseConfig, grid: str | None = None, data: str | None = None) -> int:
    """Fuse; with ``grid``, fuse every α setting of that grid file and score each on ``data``'s diagnostic split."""
    if grid is None:
        return run_cli(cfg)
    if not data or not cfg.out:
        raise ValueError("fuse --grid needs --data (a dataset root with a diagnostic split) and --out (the grid's folder)")
    summary = run_grid(cfg, GridConfig.load(grid), data, cfg.out)
    print(grid_markdown(summary))
    print("best by the rule: α " + ", ".join(f"{k} {v:g}" for k, v in summary["best"]["alpha"].items())
          + f"; wrote {cfg.out}/grid.json, grid.md and grid.png")
    return 0


def add_grid_arguments(p: ArgumentParser) -> None:
    p.add_argument("--grid", type=str | None, default=None,
                   help="an α grid file (configs/fuse-grid.yaml): fuse each setting, score it on --data's diagnostic "
                   "split, write grid.{json,md,png} under --out and name the best setting")
    p.add_argument("--data", type=str | None, default=None, help="with --grid: the dataset root")


GRID_KEYS = ("grid", "data")


def mteb_eval(model: str, out: str, tasks: list[str] | None = None, benchmark: str | None = None,
              prompts: str | None = None, batch_size: int = 32, device: str | None = None, download: bool = False,
              overwrite: Literal["only-missing", "always", "never", "only-cache"] = "only-missing",
              fps: float | None = None, max_frames: int | None = 32, progress: bool = True) -> int:
    """mteb tasks or a benchmark (e.g. "MAEB(beta)") on a local model directory, offline from the datasets cache.

    Args:
        model: model directory.
        out: folder for mteb's results (results/) and the summary (summary.md, summary.json).
        tasks: mteb task names (or --benchmark).
        benchmark: an mteb benchmark name, e.g. "MAEB(beta)" (or --tasks).
        prompts: YAML of query instructions (task name, task type, '<task>-query', ... -> instruction).
        batch_size: items per encoder forward.
        device: cuda / cpu (default: cuda when available).
        download: allow fetching datasets that are not in the local cache.
        overwrite: mteb's strategy for results already under out (only-missing resumes).
        fps: video frames per second sampled (default: the model's video_fps).
        max_frames: at most this many frames per video.
        progress: show progress bars.
    """
    from omni_lightning.evaluation.mteb import format_summary, run_mteb

    summary = run_mteb(model, out, tasks=tasks, benchmark=benchmark, prompts=prompts, batch_size=batch_size,
                       device=device, download=download, overwrite=overwrite, progress=progress, fps=fps,
                       max_frames=max_frames)
    print(format_summary(summary, model))
    print(f"wrote {out}/summary.md, {out}/summary.json and mteb's results under {out}/results")
    return 0 if summary["complete"] else 1


# name -> (function, help); the function's signature (or a dataclass) declares the options
COMMANDS: dict[str, tuple[Callable[..., int] | type, str]] = {
    "init-model": (init_model, "write a model directory: the tiny preset or an assembly of local checkpoints"),
    "make-demo-data": (make_demo_data, "write the deterministic demo corpus (webdataset shards)"),
    "shard": (shard, "turn a JSONL manifest of pairs into webdataset shards"),
    "eval": (evaluate, "retrieval metrics of a model on eval shards, per modality"),
    "fuse": (FuseConfig, "Decoupled Specialist Fusion: merge specialists into one model (streaming); "
             "configs/fuse.yaml documents every option"),
    "drift": (drift, "projector drift of models on audio–text eval pairs"),
    "pipeline": (PipelineConfig, "the whole recipe, stage by stage, with the report (configs/pipeline.yaml)"),
    "demo": (demo, "the main job (`make demo`): the pipeline with configs/pipeline.yaml"),
    "dashboard": (dashboard, "build the W&B workspace with wandb-workspaces"),
    "export": (export, "a shareable folder (transformers AutoModel, sentence-transformers) with a model card"),
    "mteb": (mteb_eval, "mteb tasks or a benchmark (MAEB) on a model directory, offline, with a summary table"),
}
JOBS: dict[str, tuple[Callable[..., int] | type, str]] = {
    "fuse": (FuseConfig, "omni-lightning fuse, then log its diagnostics as a W&B run"),
    "eval": (evaluate, "omni-lightning eval of each model (--models), then log results and examples as W&B runs"),
}


def _subparser(target, extra: Callable[[ArgumentParser], None] | None = None,
               skip: frozenset[str] = frozenset()) -> ArgumentParser:
    """A subcommand's parser: ``--config``, the options of ``target`` (a function's parameters less ``skip``, or a
    dataclass's fields), and the ``extra`` ones."""
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of this subcommand's options")
    if isinstance(target, type):
        p.add_class_arguments(target, nested_key=None, fail_untyped=True, sub_configs=True)
    else:
        p.add_function_arguments(target, skip=set(skip))
    if extra is not None:
        extra(p)
    return p


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="omni-lightning", exit_on_error=False,
                       description="Omni-modal embedding training by the Conan-embedding-v3 recipe. Training phases: "
                       "`omni-lightning fit --config configs/...yaml` (LightningCLI; see `omni-lightning fit --help`).")
    sub = p.add_subcommands(dest="command")
    for name, (target, help_) in COMMANDS.items():
        parser_ = (pipeline_parser() if name == "pipeline" else
                   _subparser(target, add_grid_arguments) if name == "fuse" else _subparser(target))
        sub.add_subcommand(name, parser_, help=help_)
    jp = ArgumentParser(exit_on_error=False, description="fuse / eval as W&B runs (offline unless WANDB_MODE says "
                        "otherwise); the SLURM scripts use them")
    sub.add_subcommand("jobs", jp, help="fuse / eval logged as W&B runs (used by slurm/fuse.sh and slurm/eval.sh)")
    jsub = jp.add_subcommands(dest="job")
    jsub.add_subcommand("fuse", _subparser(FuseConfig, jobs.add_fuse_arguments), help=JOBS["fuse"][1])
    jsub.add_subcommand("eval", _subparser(evaluate, jobs.add_eval_arguments, skip=frozenset({"model", "out"})), help=JOBS["eval"][1])
    return p


# ---------------------------------------------------------------------------------------------- shell habits
def _kinds(target, extra_lists: tuple[str, ...] = ()) -> tuple[set[str], set[str]]:
    """(boolean options, list options) of a subcommand, from its declaration."""
    if isinstance(target, type):
        hints = typing.get_type_hints(target)
    else:
        hints = {k: v for k, v in typing.get_type_hints(target).items() if k != "return"}
    bools = {k for k, t in hints.items() if bool in (t, *typing.get_args(t))}
    lists = {k for k, t in hints.items() if list in (typing.get_origin(t), *map(typing.get_origin, typing.get_args(t)))}
    return bools, lists | set(extra_lists)


def normalize(argv: list[str], bools: set[str], lists: set[str]) -> list[str]:
    """Shell habits → jsonargparse: ``--a-b`` → ``--a_b``; a bare boolean flag → ``--flag true``;
    ``--no-flag`` → ``--flag false``; several values after a list option → one YAML list."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--" or tok.startswith("--print_config"):
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if name.startswith("no_") and name[3:] in bools and not eq:
            out += [f"--{name[3:]}", "false"]
            continue
        if eq:
            out.append(f"--{name}={value}")
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if name in bools and not values:
            values = ["true"]
        if name in lists and (len(values) > 1 or (values and not values[0].lstrip().startswith("["))):
            values = [json.dumps([yaml.safe_load(v) if name == "alpha" else v for v in values])]
        out += [f"--{name}", *values]
    return out


def _normalized(argv: list[str]) -> list[str]:
    if not argv or argv[0] not in (*COMMANDS, "jobs"):
        return argv
    if argv[0] == "jobs":
        if len(argv) < 2 or argv[1] not in JOBS:
            return argv
        target = JOBS[argv[1]][0]
        bools, lists = _kinds(target, ("models",))
        if argv[1] == "eval":
            bools |= {"wandb"}
        return argv[:2] + normalize(argv[2:], bools, lists)
    bools, lists = _kinds(COMMANDS[argv[0]][0])
    return argv[:1] + normalize(argv[1:], bools, lists)


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    _quiet()
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(None if from_shell else argv)  # LightningCLI reads sys.argv itself from the shell
        return 0
    if argv and argv[0] == "pipeline":
        return run_pipeline(argv[1:])
    p = parser()
    if not argv:
        p.print_help()
        return 0
    command = argv[0]
    try:
        cfg = p.parse_args(_normalized(argv))
    except Exception as e:  # jsonargparse's message names the option and what it expected
        print(f"omni-lightning {command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return dispatch(p, cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"omni-lightning {command}: error: {e}", file=sys.stderr)
        return 2


def _options(ns) -> dict[str, Any]:
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(ns)
    d.pop("config", None)
    d.pop("__path__", None)
    return d


def dispatch(p: ArgumentParser, cfg) -> int:
    command = cfg.command
    if command == "jobs":
        job = cfg.jobs.job
        opts = _options(cfg.jobs[job])
        if job == "fuse":
            return jobs.fuse_job(fuse_config(opts, jobs.FUSE_JOB_KEYS), **{k: opts[k] for k in jobs.FUSE_JOB_KEYS})
        return jobs.eval_job(evaluate, **opts)
    opts = _options(cfg[command])
    if command == "fuse":
        return fuse(fuse_config(opts, GRID_KEYS), **{k: opts.get(k) for k in GRID_KEYS})
    return COMMANDS[command][0](**opts)


def fuse_config(opts: dict[str, Any], skip: tuple[str, ...] = ()) -> FuseConfig:
    """A :class:`FuseConfig` from parsed options (nested mappings become the option dataclasses)."""
    try:
        return FuseConfig(**{k: v for k, v in opts.items() if k not in skip})
    except TypeError as e:
        raise FusionError(str(e)) from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
