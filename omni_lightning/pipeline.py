"""The main job: run the recipe's stages in order, each skipped when its output is already complete.

Stages so far: the tiny base model θ₀ → the demo corpus → one specialist per modality (image, video,
document, audio) → fusion (task arithmetic, 0.3/0.3/0.3/0.5, with diagnostics) → projector recovery →
evaluation of every model on every modality, written as a table (rows: models, columns: modalities).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omni_lightning.model.config import CONFIG_NAME
from omni_lightning.utils import atomic_write_text

SPECIALISTS = ("image", "video", "document", "audio")
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_path(name: str) -> Path:
    """A shipped config (``configs/<name>``) — clear error when running outside a checkout."""
    p = REPO_CONFIGS / name
    if not p.is_file():
        raise FileNotFoundError(f"config {name} not found under {REPO_CONFIGS}; run from a checkout of omni-lightning")
    return p


def model_dir_complete(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def data_complete(root: Path, modalities) -> bool:
    return all((root / m / s / "index.json").is_file() for m in modalities for s in ("train", "eval"))


def fit_args(config: str, model: Path, export: Path, out: Path, name: str, steps: int | None) -> list[str]:
    """``omni-lightning fit`` arguments: a shipped config with the demo layout's paths (and budget)."""
    args = [
        "fit",
        "--config", str(config_path(config)),
        "--model.init_args.model", str(model),
        "--model.init_args.export_dir", str(export),
        "--data.init_args.data_root", str(out / "data"),
        "--trainer.default_root_dir", str(out / "lightning" / name),
        "--trainer.logger.init_args.save_dir", str(out / "logs"),
        "--trainer.enable_progress_bar", "false",
    ]
    if steps is not None:
        args += ["--trainer.max_epochs", "1", "--data.init_args.steps_per_epoch", str(steps)]
    return args


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, force: bool = False) -> dict:
    from omni_lightning.cli import lightning_cli
    from omni_lightning.data.demo import make_demo_data
    from omni_lightning.evaluation import evaluate_model, format_table
    from omni_lightning.model.build import init_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = _stage("base model θ₀ (tiny preset)")
    if force or not model_dir_complete(out / "base"):
        init_model(out / "base", preset="tiny", overwrite=True)
    timings["base"] = time.perf_counter() - t

    t = _stage("demo corpus")
    mods = ("text", *SPECIALISTS)
    if force or not data_complete(out / "data", mods):
        make_demo_data(out / "data", overwrite=True)
    timings["data"] = time.perf_counter() - t

    for m in SPECIALISTS:
        t = _stage(f"specialist: {m}")
        if force or not model_dir_complete(out / "specialists" / m):
            lightning_cli(fit_args(f"specialist/{m}.yaml", out / "base", out / "specialists" / m, out,
                                   f"specialist-{m}", steps))
        timings[f"specialist-{m}"] = time.perf_counter() - t

    t = _stage("fusion: task arithmetic (α image/video/document 0.3, audio 0.5)")
    if force or not model_dir_complete(out / "fused"):
        from omni_lightning.fusion import format_diagnostics, fuse, load_config

        cfg = load_config(config_path("fuse.yaml"), {
            "base": str(out / "base"),
            "specialists": [str(out / "specialists" / m) for m in SPECIALISTS],
            "out": str(out / "fused"), "overwrite": True, "progress": False,
        })
        result = fuse(cfg)
        print(format_diagnostics(result.diagnostics))
    timings["fuse"] = time.perf_counter() - t

    t = _stage("projector recovery (backbone and audio encoder frozen)")
    if force or not model_dir_complete(out / "recovered"):
        lightning_cli(fit_args("recover.yaml", out / "fused", out / "recovered", out, "recover", steps))
    timings["recover"] = time.perf_counter() - t

    t = _stage("evaluation (eval split, R@1 text→media)")
    models = {"base": out / "base", **{f"{m} specialist": out / "specialists" / m for m in SPECIALISTS},
              "fused": out / "fused", "recovered": out / "recovered"}
    rows = {name: evaluate_model(d, out / "data", modalities=list(SPECIALISTS), progress=False)
            for name, d in models.items()}
    timings["eval"] = time.perf_counter() - t

    table = format_table(rows)
    print("\nR@1 (text query → media, eval split; chance ≈ 1/#captions)\n")
    print(table)
    print("\nOwn modality: base → specialist → fused → recovered")
    for m in SPECIALISTS:
        r = [rows[k][m]["q2c_r1"] for k in ("base", f"{m} specialist", "fused", "recovered")]
        print(f"  {m:9s} " + " → ".join(f"{x:.3f}" for x in r))
    report = {"results": rows, "timings_s": timings}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", "# omni-lightning demo\n\nR@1, text → media, eval split.\n\n" + table + "\n")
    print(f"\nwrote {out / 'report.md'} and {out / 'report.json'}; total {sum(timings.values()):.0f} s")
    return report
