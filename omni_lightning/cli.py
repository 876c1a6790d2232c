"""``omni-lightning`` — the command line.

Training subcommands go through LightningCLI (``fit``, ``validate``, ``test``, with ``--config`` YAMLs from
``configs/``); the recipe's other steps are plain subcommands:

    omni-lightning fit --config configs/specialist/image.yaml
    omni-lightning init-model --preset tiny --out runs/base
    omni-lightning make-demo-data --out runs/data
    omni-lightning shard --manifest pairs.jsonl --modality image --split train --out runs/data
    omni-lightning eval --model runs/image --data runs/data [--out results.json]
    omni-lightning pipeline --config configs/pipeline.yaml --out runs/demo
    omni-lightning demo --out runs/demo          (the same, with the shipped configs/pipeline.yaml)
    omni-lightning fuse --config configs/fuse.yaml [--method ties --density 0.2] [--diagnose-only]

Weights move between phases as model directories (``--model.init_args.model DIR``), never through
``--ckpt_path`` (which restores the checkpoint's saved hyper-parameters over your config and is meant only
for resuming the same phase).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


def lightning_cli(args: list[str] | None = None, run: bool = True):
    from lightning.pytorch.cli import LightningCLI

    from omni_lightning import modules  # noqa: F401  (register short class names)
    from omni_lightning.data.datamodule import OmniDataModule
    from omni_lightning.modules.base import OmniModule

    class OmniCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the datamodule builds inputs with the processor of the model it trains, and splits sides
            # into GradCache chunks of the module's chunk size
            parser.link_arguments("model.init_args.model", "data.init_args.model")
            parser.link_arguments("model.init_args.grad_cache_chunk", "data.init_args.chunk_size")

    return OmniCLI(
        model_class=OmniModule,
        datamodule_class=OmniDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omni-lightning",
        description="Omni-modal embedding training by the Conan-embedding-v3 recipe. Training phases: "
        "`omni-lightning fit --config configs/...yaml` (LightningCLI; see `omni-lightning fit --help`).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("init-model", help="write a model directory: the tiny preset or an assembly of local checkpoints")
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="embedded preset (default: tiny; small: ~30 M parameters)")
    s.add_argument("--backbone", help="local Qwen3-VL / Qwen2-VL / Qwen2.5-VL checkpoint directory")
    s.add_argument("--audio-encoder", help="local Qwen3-Omni / Qwen3-Omni audio encoder / Whisper checkpoint directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of assembled weights")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("make-demo-data", help="write the deterministic demo corpus (webdataset shards)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=int, default=None, help="train pairs per modality")
    s.add_argument("--n-eval", type=int, default=None, help="eval pairs per modality")
    s.add_argument("--modalities", nargs="+", default=None)
    s.add_argument("--corpus", default="recipe", choices=["recipe", "pretrain"],
                   help="recipe: the five modalities' pairs; pretrain: the stage-0 corpus (text + glyph images)")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("shard", help="turn a JSONL manifest of pairs into webdataset shards")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True, help="dataset root; shards go to OUT/<modality>/<split>/")
    s.add_argument("--modality", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--max-per-shard", type=int, default=1000)
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("eval", help="retrieval (R@1/5/10, nDCG@10, MRR both ways), pool Hit@1 and zero-shot "
                       "accuracy of a model on eval shards, per modality")
    s.add_argument("--model", required=True, help="model directory")
    s.add_argument("--data", required=True, help="dataset root (with <modality>/<split>/ shards)")
    s.add_argument("--modalities", nargs="+", default=None, help="default: every modality with shards")
    s.add_argument("--split", default="eval")
    s.add_argument("--batch-size", type=int, default=64, help="items per encoder forward")
    s.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples per modality")
    s.add_argument("--pool-size", type=int, default=100, help="candidates per query for MMEB-style Hit@1")
    s.add_argument("--query-chunk", type=int, default=1024, help="queries scored at once (bounds memory)")
    s.add_argument("--cand-chunk", type=int, default=16384, help="candidates scored at once (bounds memory)")
    s.add_argument("--no-progress", dest="progress", action="store_false")
    s.add_argument("--out", help="write results as JSON here")

    s = sub.add_parser("fuse", help="Decoupled Specialist Fusion: merge specialists into one model (streaming)",
                       description="Fuse specialists' task vectors into the base (task arithmetic, TIES, DARE, linear); "
                       "modules and tokens only one specialist has are copied from it. Options come from --config "
                       "(configs/fuse.yaml documents every key); the flags below and --set override it.")
    s.add_argument("--config", help="YAML config (e.g. configs/fuse.yaml)")
    s.add_argument("--base", help="base model directory θ₀")
    s.add_argument("--specialists", nargs="+", metavar="DIR", help="specialist model directories")
    s.add_argument("--alpha", nargs="+", type=float, help="one coefficient per specialist, in order")
    s.add_argument("--names", nargs="+", help="specialist names (default: directory names)")
    s.add_argument("--method", choices=["task_arithmetic", "ties", "dare", "linear"])
    s.add_argument("--density", type=float, help="ties.density: fraction of each task vector kept, in (0, 1]")
    s.add_argument("--p", type=float, help="dare.p: drop probability, in [0, 1)")
    s.add_argument("--seed", type=int, help="dare.seed")
    s.add_argument("--out", help="output model directory")
    s.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    s.add_argument("--diagnose-only", action="store_true", default=None,
                   help="print task-vector diagnostics (norms, cosines, per-layer norms); write no model")
    s.add_argument("--diagnostics-dir", help="with --diagnose-only: also write diagnostics.json/.png here")
    s.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (dotted, YAML value), e.g. --set parts.vision_encoder.mode=keep_base")

    s = sub.add_parser("drift", help="projector drift of a model on audio–text eval pairs (vs an optional reference)")
    s.add_argument("--model", required=True, nargs="+", help="model directory (several: one row each)")
    s.add_argument("--reference", help="reference model directory, e.g. the audio specialist")
    s.add_argument("--data", required=True, help="dataset root (with audio/<split>/ shards)")
    s.add_argument("--split", default="eval")
    s.add_argument("--max-samples", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", help="write results as JSON here")

    sub.add_parser("pipeline", help="the whole recipe, stage by stage, with the report "
                   "(omni-lightning pipeline --config configs/pipeline.yaml [--out DIR] [--force STAGES]; see --help)")
    s = sub.add_parser("demo", help="the main job (`make demo`): the pipeline with configs/pipeline.yaml")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--force", default="", help="comma-separated stages to redo (see `pipeline --help`)")

    s = sub.add_parser("dashboard", help="build the W&B workspace (a section per phase) with wandb-workspaces",
                       description="Dashboards as code: see omni_lightning/dashboard.py. Saving needs "
                       "WANDB_MODE=online and a W&B API key; --dry-run prints the workspace without network.")
    from omni_lightning.dashboard import add_arguments as add_dashboard_arguments

    add_dashboard_arguments(s)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(None if from_shell else argv)  # LightningCLI reads sys.argv itself from the shell
        return 0
    if argv and argv[0] == "pipeline":
        from omni_lightning.pipeline import main as pipeline_main

        return pipeline_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        return _dispatch(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"omni-lightning {args.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "init-model":
        from omni_lightning.model.build import init_model

        out = init_model(args.out, preset=args.preset, backbone=args.backbone, audio_encoder=args.audio_encoder,
                         seed=args.seed, overwrite=args.overwrite, dtype=args.dtype)
        print(f"wrote model directory {out}")
    elif args.command == "make-demo-data":
        from omni_lightning.data.demo import make_demo_data

        kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_eval", args.n_eval), ("modalities", args.modalities)) if v is not None}
        summary = make_demo_data(args.out, seed=args.seed, overwrite=args.overwrite, corpus=args.corpus, **kwargs)
        print(json.dumps(summary, indent=2, default=str))
    elif args.command == "shard":
        from omni_lightning.data.shards import shard_manifest

        out = shard_manifest(args.manifest, args.out, args.modality, args.split, max_per_shard=args.max_per_shard,
                             overwrite=args.overwrite)
        print(f"wrote shards to {out}")
    elif args.command == "eval":
        from omni_lightning.evaluation import evaluate_model, format_metrics

        results = evaluate_model(args.model, args.data, modalities=args.modalities, split=args.split,
                                 batch_size=args.batch_size, progress=args.progress, max_samples=args.max_samples,
                                 pool_size=args.pool_size, query_chunk=args.query_chunk, cand_chunk=args.cand_chunk)
        print(f"{args.model} on {args.data} ({args.split}):")
        print(format_metrics(results))
        if args.out:
            from omni_lightning.utils import atomic_write_text

            atomic_write_text(args.out, json.dumps(results, indent=2))
    elif args.command == "fuse":
        import yaml

        from omni_lightning.fusion import run_cli

        flags = {"base": args.base, "specialists": args.specialists, "alpha": args.alpha, "names": args.names,
                 "method": args.method, "ties.density": args.density, "dare.p": args.p, "dare.seed": args.seed,
                 "out": args.out, "overwrite": args.overwrite, "diagnose_only": args.diagnose_only,
                 "diagnostics_dir": args.diagnostics_dir, "progress": args.progress}
        overrides = {k: v for k, v in flags.items() if v is not None}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key.strip()] = yaml.safe_load(value)
        return run_cli(args.config, overrides)
    elif args.command == "drift":
        from omni_lightning.callbacks.projector_drift import format_drift, load_pairs, measure_drift
        from omni_lightning.model.omni import load_model_and_processor

        samples = load_pairs(args.data, args.split, args.max_samples)
        ref = load_model_and_processor(args.reference) if args.reference else (None, None)
        rows = {}
        for m in args.model:
            model, processor = load_model_and_processor(m)
            rows[Path(m).name] = measure_drift(model, processor, samples, ref[0], ref[1], args.batch_size)
        print(format_drift(rows))
        if args.out:
            from omni_lightning.utils import atomic_write_text

            atomic_write_text(args.out, json.dumps(rows, indent=2))
    elif args.command == "demo":
        from omni_lightning.pipeline import config_path
        from omni_lightning.pipeline import main as pipeline_main

        return pipeline_main(["--config", str(config_path("pipeline.yaml")), "--out", args.out, "--force", args.force])
    elif args.command == "dashboard":
        from omni_lightning.dashboard import run_cli as dashboard_cli

        return dashboard_cli(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
