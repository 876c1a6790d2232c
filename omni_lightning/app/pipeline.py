"""The whole recipe as one command — ``omni-lightning pipeline --config configs/pipeline.yaml [--out DIR]``.

Stages, in order (each writes one output under ``OUT``)::

    init          random tiny preset                              OUT/init        (skipped for a given base)
    pretrain-data stage-0 corpus                                  OUT/pretrain-data
    pretrain      stage 0: θ₀ learns to read and see              OUT/base        (or base.model is θ₀)
    data          the demo corpus (or the given shards)           OUT/data
    specialist-M  one per modality M, from θ₀                      OUT/specialists/M
    joint-N       (after the specialists; listed below)
    fuse          task arithmetic + diagnostics                    OUT/fused
    recover       projector recovery                               OUT/recovered   (recover: null skips it)
    rehearse      balanced multi-modal rehearsal                   OUT/final       (rehearse: null skips it)
    joint-N       joint-training baseline N from θ₀                OUT/joint/N     (joint: {} skips them)
    grid          α grid scored on the diagnostic split             OUT/grid        (fuse.grid: null skips it)
    eval          every model on every modality                    OUT/eval/<model>.json
    report        report.md, report.json, report.png               OUT/

A stage is skipped when its output is complete **and** was made from the same inputs: every finished stage
leaves a record (``OUT/.pipeline/<stage>.json``) of the fingerprints of its inputs (model directories, shard
indexes, its config file and overrides), so redoing a stage (``--force fuse``) or changing its config also
redoes every stage downstream of it, and nothing stale survives. A failing stage stops the pipeline with its
error; the stages before it stay finished and are skipped when the command is run again. Every output is
written atomically (model directories and shards by their writers, reports by temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from omni_lightning.app.fit import lightning_cli
from omni_lightning.app.grid import GridConfig, run_grid
from omni_lightning.app.report import DRIFT_MODELS, drift_rows, write_report
from omni_lightning.demo import init_demo_model, make_demo_data
from omni_lightning.evaluation import evaluate_model
from omni_lightning.fusion import FuseConfig, format_diagnostics, fuse, load_config
from omni_lightning.modalities import SPECIALISTS
from omni_lightning.model.config import CONFIG_NAME
from omni_lightning.utils import atomic_write_text, check_output_apart

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECORDS = ".pipeline"


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BaseSettings:
    """θ₀: a given local model directory, or the embedded preset (with stage-0 pretraining)."""

    model: str | None = None  # a local model directory to start from (skips init and pretrain)
    preset: str = "tiny"
    seed: int = 0
    pretrain: str | None = "pretrain.yaml"  # stage-0 fit config (null: use the random preset as θ₀)


@dataclass
class DataSettings:
    """The shards: a given dataset root, or the generated demo corpus."""

    root: str | None = None  # <root>/<modality>/{train,eval}/ shards; null: generate the demo corpus
    seed: int = 0
    n_train: int = 1200
    n_eval: int = 300
    n_diag: int = 200  # the diagnostic split the α grid is scored on (0: none)
    pretrain_n_train: int = 1200  # stage-0 corpus sizes
    pretrain_n_eval: int = 300


@dataclass
class FuseSettings:
    config: str = "fuse.yaml"
    alpha: dict[str, float] = field(default_factory=lambda: {"image": 0.3, "video": 0.3, "document": 0.3, "audio": 0.5})
    grid: str | None = "fuse-grid.yaml"  # the α grid on the diagnostic split (null: none)


@dataclass
class EvalSettings:
    modalities: list[str] = field(default_factory=lambda: [*SPECIALISTS, "text"])
    batch_size: int = 64
    pool_size: int = 100
    max_samples: int | None = None


@dataclass
class Budget:
    """Overrides for every fit stage (null: the stage config's value). For smoke runs and tests."""

    seed: int | None = None  # seed_everything of every fit (null: each config's own)
    steps_per_epoch: int | None = None
    max_epochs: int | None = None
    batch_size: int | None = None
    val_batches: int | None = None
    num_workers: int | None = None
    progress_bar: bool = False
    logger: bool = True  # CSV logs under OUT/logs/<stage>


@dataclass
class PipelineConfig:
    out: str = "runs/demo"
    base: BaseSettings = field(default_factory=BaseSettings)
    data: DataSettings = field(default_factory=DataSettings)
    specialists: dict[str, str] = field(default_factory=lambda: {m: f"specialist/{m}.yaml" for m in SPECIALISTS})
    # joint-training baselines (name -> fit config), each given the specialists' steps of its modalities combined
    joint: dict[str, str] = field(default_factory=lambda: {"vision": "joint/vision.yaml", "all": "joint/all.yaml"})
    fuse: FuseSettings = field(default_factory=FuseSettings)
    recover: str | None = "recover.yaml"  # null: no projector recovery (e.g. no audio specialist)
    rehearse: str | None = "rehearse.yaml"  # null: no rehearsal
    eval: EvalSettings = field(default_factory=EvalSettings)
    budget: Budget = field(default_factory=Budget)


class PipelineError(RuntimeError):
    """A stage failed; earlier stages are finished and will be skipped on the next run."""


def config_path(name: str | Path) -> Path:
    """A fit config: a path as given, else relative to the checkout's ``configs/``."""
    p = Path(name)
    if p.is_file():
        return p
    q = REPO_CONFIGS / name
    if q.is_file():
        return q
    raise FileNotFoundError(f"config {name} not found (as a path, or under {REPO_CONFIGS})")


# ---------------------------------------------------------------------------------------------- fingerprints
def model_dir_complete(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def data_complete(root: Path, modalities, splits=("train", "eval")) -> bool:
    return all((root / m / s / "index.json").is_file() for m in modalities for s in splits)


def fit_config(name: str) -> dict[str, Any]:
    return yaml.safe_load(config_path(name).read_text()) or {}


def joint_label(modalities: list[str]) -> str:
    """The report's row name of a joint baseline, e.g. ``joint: image+video+document``."""
    return "joint: " + "+".join(modalities)


def fingerprint(path: Path) -> str:
    """Cheap identity of a model directory or dataset root: names, sizes and mtimes of its files, and the
    content of its small JSON files."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()[:16]
    for f in sorted(p for p in path.rglob("*") if p.is_file() and RECORDS not in p.parts):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.suffix == ".json" and st.st_size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    output: Path
    inputs: dict[str, Any]  # name → path (fingerprinted) or a plain value
    run: Callable[[], None]
    complete: Callable[[], bool]


class Pipeline:
    def __init__(self, cfg: PipelineConfig, force: list[str] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.force = set(force or [])
        self.timings: dict[str, float] = {}
        self.ran: list[str] = []
        self._check_inputs()  # before anything is generated or written
        self.stages = self._plan()
        known = {s.name for s in self.stages} | {"all", "specialists", "eval"}
        unknown = self.force - known
        if unknown:
            raise ValueError(f"--force {sorted(unknown)}: unknown stage; stages are {[s.name for s in self.stages]}, "
                             "or 'specialists' / 'all'")

    def _check_inputs(self) -> None:
        """Every given input exists, and no output folder is, contains or lies inside one: a missing base model or
        data root fails here, not after the corpus was generated."""
        cfg = self.cfg
        inputs: dict[str, Path | None] = {}
        if cfg.base.model:
            base = Path(cfg.base.model)
            if not (base / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"base.model {base} is not a model directory (no {CONFIG_NAME}); write one "
                                        "with `omni-lightning init-model`, or set base.model: null for the tiny preset")
            inputs["base.model"] = base
        if cfg.data.root:
            root = Path(cfg.data.root)
            missing = [m for m in cfg.specialists if not (root / m / "train" / "index.json").is_file()]
            if missing:
                raise FileNotFoundError(f"data.root {root} has no train shards for {missing} (expected "
                                        f"{root}/<modality>/train/index.json; `omni-lightning shard` writes them)")
            inputs["data.root"] = root
        configs = [cfg.base.pretrain, *cfg.specialists.values(), *cfg.joint.values(), cfg.fuse.config, cfg.fuse.grid,
                   cfg.recover, cfg.rehearse]
        for c in configs:
            if c:
                config_path(c)  # a missing config is an error now
        if inputs:
            check_output_apart(self.out, inputs, "the pipeline's out folder")

    # paths
    @property
    def base_dir(self) -> Path:
        if self.cfg.base.model:
            return Path(self.cfg.base.model)
        return self.out / ("base" if self.cfg.base.pretrain else "init")

    @property
    def data_root(self) -> Path:
        return Path(self.cfg.data.root) if self.cfg.data.root else self.out / "data"

    def models(self) -> dict[str, Path]:
        """The models the report compares, in row order."""
        rows = {"base": self.base_dir}
        rows.update({f"{m} specialist": self.out / "specialists" / m for m in self.cfg.specialists})
        rows["fused"] = self.out / "fused"
        if self.cfg.recover:
            rows["recovered"] = self.out / "recovered"
        if self.cfg.rehearse:
            rows["final (rehearsed)"] = self.out / "final"
        rows.update({joint_label(self.joint_modalities(n)): self.out / "joint" / n for n in self.cfg.joint})
        return rows

    def joint_modalities(self, name: str) -> list[str]:
        return list(fit_config(self.cfg.joint[name])["data"]["init_args"]["modalities"])

    def joint_steps(self, name: str) -> int:
        """The specialists' training steps for the joint baseline's modalities, combined (budget overrides apply)."""
        b, total = self.cfg.budget, 0
        for m in self.joint_modalities(name):
            if m not in self.cfg.specialists:
                raise ValueError(f"joint baseline {name!r} trains {m}, which has no specialist to match its steps")
            spec = fit_config(self.cfg.specialists[m])
            steps = b.steps_per_epoch or spec["data"]["init_args"]["steps_per_epoch"]
            total += steps * (b.max_epochs or spec["trainer"]["max_epochs"])
        return total

    # fit arguments
    def fit_args(self, config: str, model: Path, export: Path, data_root: Path, name: str) -> list[str]:
        b = self.cfg.budget
        args = ["fit", "--config", str(config_path(config)),
                "--model.init_args.model", str(model), "--model.init_args.export_dir", str(export),
                "--data.init_args.data_root", str(data_root),
                "--trainer.default_root_dir", str(self.out / "lightning" / name),
                "--trainer.enable_progress_bar", str(b.progress_bar).lower(),
                "--model.init_args.export_overwrite", "true"]  # the pipeline's own stage outputs
        if b.logger:
            logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                      "init_args": {"save_dir": str(self.out / "logs"), "name": name}}
            args += ["--trainer.logger", json.dumps(logger)]
        else:
            args += ["--trainer.logger", "false"]
        for key, value in (("seed_everything", b.seed),
                           ("data.init_args.steps_per_epoch", b.steps_per_epoch), ("trainer.max_epochs", b.max_epochs),
                           ("data.init_args.batch_size", b.batch_size), ("data.init_args.val_batches", b.val_batches),
                           ("data.init_args.num_workers", b.num_workers)):
            if value is not None:
                args += [f"--{key}", str(value)]
        return args

    def _fit(self, config: str, model: Path, export: Path, data_root: Path, name: str,
             extra: list[str] | None = None) -> Stage:
        args = self.fit_args(config, model, export, data_root, name) + list(extra or [])

        def run() -> None:
            lightning_cli(args)
            if not model_dir_complete(export):
                raise RuntimeError(f"fit finished but wrote no model directory at {export}")

        inputs = {"model": model, "data": data_root, "config": config_path(config),
                  "args": [a for a in args if not a.startswith("{")]}
        return Stage(name, export, inputs, run, lambda: model_dir_complete(export))

    def _plan(self) -> list[Stage]:
        cfg, out = self.cfg, self.out
        stages: list[Stage] = []
        if not cfg.base.model:
            init = out / "init"

            def run_init() -> None:
                init_demo_model(init, preset=cfg.base.preset, seed=cfg.base.seed, overwrite=True)

            stages.append(Stage("init", init, {"preset": cfg.base.preset, "seed": cfg.base.seed}, run_init,
                                lambda: model_dir_complete(init)))
            if cfg.base.pretrain:
                pdata = out / "pretrain-data"
                stages.append(self._data_stage("pretrain-data", pdata, "pretrain", cfg.data.pretrain_n_train,
                                               cfg.data.pretrain_n_eval, ("text", "image")))
                stages.append(self._fit(cfg.base.pretrain, init, out / "base", pdata, "pretrain"))
        if not cfg.data.root:
            stages.append(self._data_stage("data", out / "data", "recipe", cfg.data.n_train, cfg.data.n_eval,
                                           ("text", *SPECIALISTS), cfg.data.n_diag))
        for m, conf in cfg.specialists.items():
            stages.append(self._fit(conf, self.base_dir, out / "specialists" / m, self.data_root, f"specialist-{m}"))
        for n, conf in cfg.joint.items():  # one epoch of the specialists' steps combined (later flags win)
            steps = ["--data.init_args.steps_per_epoch", str(self.joint_steps(n)), "--trainer.max_epochs", "1"]
            stages.append(self._fit(conf, self.base_dir, out / "joint" / n, self.data_root, f"joint-{n}", steps))
        stages.append(self._fuse_stage("fuse", out / "fused", cfg.fuse.alpha))
        if cfg.fuse.grid:
            stages.append(self._grid_stage(out / "grid"))
        start = out / "fused"
        if cfg.recover:
            stages.append(self._fit(cfg.recover, start, out / "recovered", self.data_root, "recover"))
            start = out / "recovered"
        if cfg.rehearse:  # from the recovered model, or straight from the fused one when recovery is skipped
            stages.append(self._fit(cfg.rehearse, start, out / "final", self.data_root, "rehearse"))
        return stages

    def _data_stage(self, name: str, root: Path, corpus: str, n_train: int, n_eval: int, mods, n_diag: int = 0
                    ) -> Stage:
        seed = self.cfg.data.seed

        def run() -> None:
            make_demo_data(root, seed=seed, n_train=n_train, n_eval=n_eval, corpus=corpus, overwrite=True,
                           progress=True, n_diag=n_diag)

        inputs = {"corpus": corpus, "seed": seed, "n_train": n_train, "n_eval": n_eval, "n_diag": n_diag}
        splits = ("train", "eval", "diag") if n_diag else ("train", "eval")
        return Stage(name, root, inputs, run, lambda: data_complete(root, mods, splits))

    def _fuse_config(self, out_dir: Path, alpha: dict[str, float]) -> FuseConfig:
        names = list(self.cfg.specialists)
        missing = [m for m in names if m not in alpha]
        if missing:
            raise ValueError(f"fuse.alpha has no coefficient for specialists {missing}")
        return load_config(config_path(self.cfg.fuse.config), {
            "base": str(self.base_dir), "specialists": [str(self.out / "specialists" / m) for m in names],
            "names": names, "alpha": [float(alpha[m]) for m in names], "out": str(out_dir), "overwrite": True,
            "progress": False})

    def _fusion_inputs(self) -> dict[str, Any]:
        return {"base": self.base_dir, **{f"specialist-{m}": self.out / "specialists" / m for m in self.cfg.specialists},
                "alpha": self.cfg.fuse.alpha, "config": config_path(self.cfg.fuse.config)}

    def _fuse_stage(self, name: str, out_dir: Path, alpha: dict[str, float]) -> Stage:
        self._fuse_config(out_dir, alpha)  # a missing coefficient is an error before anything runs

        def run() -> None:
            print(format_diagnostics(fuse(self._fuse_config(out_dir, alpha)).diagnostics))

        return Stage(name, out_dir, self._fusion_inputs(), run, lambda: model_dir_complete(out_dir))

    def _grid_stage(self, out_dir: Path) -> Stage:
        grid_file = config_path(self.cfg.fuse.grid)

        def run() -> None:
            run_grid(self._fuse_config(out_dir / "fused", self.cfg.fuse.alpha), GridConfig.load(grid_file),
                     self.data_root, out_dir)

        inputs = {**self._fusion_inputs(), "grid": grid_file, "data": self.data_root}
        return Stage("grid", out_dir, inputs, run, lambda: (out_dir / "grid.json").is_file())

    # running
    def _fingerprints(self, stage: Stage) -> dict[str, Any]:
        return {k: (fingerprint(v) if isinstance(v, Path) and v.exists() else str(v) if isinstance(v, Path) else v)
                for k, v in stage.inputs.items()}

    def _record_path(self, stage: Stage) -> Path:
        return self.out / RECORDS / f"{stage.name}.json"

    def is_done(self, stage: Stage) -> bool:
        rec = self._record_path(stage)
        if not (stage.complete() and rec.is_file()):
            return False
        try:
            record = json.loads(rec.read_text())
        except ValueError:
            return False
        return record.get("inputs") == json.loads(json.dumps(self._fingerprints(stage)))

    def _forced(self, stage: Stage) -> bool:
        return bool({"all", stage.name} & self.force) or (
            "specialists" in self.force and stage.name.startswith("specialist-"))

    def run_stage(self, stage: Stage) -> None:
        if not self._forced(stage) and self.is_done(stage):
            print(f"[skip] {stage.name}: {stage.output} is complete", flush=True)
            return
        print(f"\n=== {stage.name} → {stage.output} ===", flush=True)
        t = time.perf_counter()
        try:
            stage.run()
        except (Exception, SystemExit) as e:  # a failed stage stops the pipeline; finished stages stay usable
            # (LightningCLI reports a bad config by exiting: that is a failed stage too, not the end of us)
            raise PipelineError(f"stage '{stage.name}' failed: {type(e).__name__}: {e}") from e
        if not stage.complete():
            raise PipelineError(f"stage '{stage.name}' finished but its output {stage.output} is incomplete")
        self.timings[stage.name] = time.perf_counter() - t
        self.ran.append(stage.name)
        record = {"stage": stage.name, "output": str(stage.output), "inputs": self._fingerprints(stage),
                  "seconds": round(self.timings[stage.name], 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self._record_path(stage), json.dumps(record, indent=2, default=str))

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            self.run_stage(stage)
        t = time.perf_counter()
        try:
            results = self.evaluate()
            report = write_report(self, results, self.drift())
        except Exception as e:
            raise PipelineError(f"stage 'eval/report' failed: {type(e).__name__}: {e}") from e
        self.timings["eval+report"] = time.perf_counter() - t
        return report

    def evaluate(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every model × every modality; each model's results cached in ``OUT/eval/<model>.json`` with the
        model's fingerprint (re-evaluated when the model or the eval settings change, or with ``--force eval``)."""
        e = self.cfg.eval
        settings = asdict(e) | {"data": fingerprint(self.data_root)}
        results = {}
        for name, d in self.models().items():
            mods = e.modalities
            results[name] = self._cached(
                re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_"), {"model": fingerprint(d), "settings": settings},
                f"{name} ({d})", lambda d=d, mods=mods: evaluate_model(
                    d, self.data_root, modalities=mods, batch_size=e.batch_size, progress=True,
                    max_samples=e.max_samples, pool_size=e.pool_size))
        return results

    def drift(self) -> dict[str, dict[str, float]]:
        """The drift table: audio–text eval pairs through each audio-carrying model, against the audio specialist
        (cached like :meth:`evaluate`)."""
        reference = self.out / "specialists" / "audio"
        if "audio" not in self.cfg.eval.modalities or not reference.is_dir():
            return {}
        models = {n: d for n, d in self.models().items() if n in DRIFT_MODELS and d.is_dir()}
        key = {"reference": fingerprint(reference), "models": {n: fingerprint(d) for n, d in models.items()},
               "data": fingerprint(self.data_root / "audio")}
        return self._cached("drift", key, "projector drift", lambda: drift_rows(models, self.data_root, reference))

    def _cached(self, name: str, key: dict[str, Any], what: str, compute: Callable[[], Any]) -> Any:
        """``OUT/eval/<name>.json`` when it was computed from the same ``key`` (fingerprints of the models, data and
        settings) and ``--force eval`` is off; otherwise ``compute()``, written there atomically."""
        cache = self.out / "eval" / f"{name}.json"
        if cache.is_file() and not ({"eval", "all"} & self.force):
            cached = json.loads(cache.read_text())
            if cached.get("key") == key and "value" in cached:  # (files of older versions are recomputed)
                return cached["value"]
        print(f"[eval] {what}", flush=True)
        value = compute()
        atomic_write_text(cache, json.dumps({"key": key, "value": value}, indent=2))
        return value


# ---------------------------------------------------------------------------------------------- entry points
def parser():
    p = ArgumentParser(prog="omni-lightning pipeline", description=__doc__.split("\n\n")[0],
                       default_config_files=[], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (configs/pipeline.yaml documents every key)")
    p.add_class_arguments(PipelineConfig, nested_key=None, fail_untyped=True, sub_configs=True)
    p.add_argument("--force", type=str, default="",
                   help="redo these stages and everything downstream of them: comma-separated stage names "
                   "(init, pretrain-data, pretrain, data, specialist-<modality>, joint-<name>, fuse, grid, recover, "
                   "rehearse, eval), 'specialists' or 'all'")
    return p


def load_pipeline_config(argv: list[str]) -> tuple[PipelineConfig, list[str]]:
    p = parser()
    ns = p.parse_args(argv)
    force = [f.strip() for f in (ns.pop("force") or "").split(",") if f.strip()]
    ns.pop("config", None)
    init = p.instantiate_classes(ns)
    cfg = PipelineConfig(**{k: init[k] for k in PipelineConfig.__dataclass_fields__})
    return cfg, force


def run_pipeline(argv: list[str]) -> int:
    try:
        cfg, force = load_pipeline_config(argv)
        pipe = Pipeline(cfg, force)
    except Exception as e:
        print(f"omni-lightning pipeline: error: {e}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    try:
        pipe.run()
    except PipelineError as e:
        traceback.print_exception(e.__cause__ or e, file=sys.stderr, limit=-3)
        done = [s.name for s in pipe.stages if pipe.is_done(s)]
        print(f"\nomni-lightning pipeline: {e}\nfinished stages (skipped on the next run): {', '.join(done) or 'none'}",
              file=sys.stderr)
        return 1
    print(f"pipeline finished in {time.perf_counter() - t:.0f} s (ran: {', '.join(pipe.ran) or 'nothing, all complete'})")
    return 0
