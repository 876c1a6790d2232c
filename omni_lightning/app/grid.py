"""The α grid: fuse with each setting of the coefficients, evaluate each fused model on a *diagnostic* split (never
the eval split), and name the best setting by a stated rule — how the paper chose α = 0.3 / 0.3 / 0.3 / 0.5.

    omni-lightning fuse --config configs/fuse.yaml --grid configs/fuse-grid.yaml --data runs/demo/data \
        --out runs/demo/grid

writes ``grid.json`` (every setting, its hit@1 per modality, the best one), ``grid.md`` (the table) and
``grid.png`` (audio and mean vision hit@1 across α_audio, one line per α_vision: raising α_audio helps audio and
costs vision, the trade-off that coefficients alone cannot resolve). Each setting streams through the same
fusion engine as ``fuse`` into one reused folder, so the grid's cost is (fusion + a small evaluation) × settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omni_lightning.app.report import PRIMARY
from omni_lightning.evaluation import evaluate_model
from omni_lightning.fusion import FuseConfig, fuse
from omni_lightning.modalities import VISUAL
from omni_lightning.utils import atomic_savefig, atomic_write_text

RULES = ("mean", "min")
VISION = "vision"  # an axis name that sets image, video and document together


@dataclass
class GridConfig:
    """What to try and how to choose (``configs/fuse-grid.yaml`` documents every key)."""

    axes: dict[str, list[float]] = field(default_factory=lambda: {"audio": [0.1, 0.3, 0.5, 0.7, 0.9],
                                                                   VISION: [0.3]})
    split: str = "diag"  # the data split the settings are scored on; never the eval split
    max_samples: int | None = 100  # per modality
    batch_size: int = 64
    rule: str = "mean"  # mean: highest mean hit@1 over the specialists' modalities; min: highest worst modality

    @classmethod
    def load(cls, path: str | Path) -> GridConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"grid config {p} not found")
        data = yaml.safe_load(p.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{p}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def validate(self, names: list[str]) -> None:
        if self.rule not in RULES:
            raise ValueError(f"grid rule must be one of {RULES}, got {self.rule!r}")
        if self.split == "eval":
            raise ValueError("the grid chooses α: score it on a diagnostic split, not on 'eval'")
        for axis, values in self.axes.items():
            if axis != VISION and axis not in names:
                raise ValueError(f"grid axis {axis!r} is not a specialist ({names}) or {VISION!r}")
            if not values or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"grid axis {axis!r} needs a non-empty list of numbers, got {values!r}")


def settings(grid: GridConfig, names: list[str], alpha: list[float]) -> list[dict[str, float]]:
    """Every coefficient setting of the grid (the product of its axes), as ``{specialist: α}``, in grid order."""
    base = dict(zip(names, map(float, alpha)))
    out = []
    for combo in itertools.product(*grid.axes.values()):
        s = dict(base)
        for axis, value in zip(grid.axes, combo):
            for name in ([n for n in names if n in VISUAL] if axis == VISION else [axis]):
                s[name] = float(value)
        out.append(s)
    return out


def score(row: dict[str, float], rule: str) -> float:
    values = list(row.values())
    return min(values) if rule == "min" else sum(values) / len(values)


def run_grid(cfg: FuseConfig, grid: GridConfig, data_root: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Fuse and score every setting; write ``grid.{json,md,png}`` under ``out_dir`` and return the summary."""
    names = list(cfg.names or [Path(s).name for s in cfg.specialists])
    alpha = cfg.alpha if isinstance(cfg.alpha, list) else [float(cfg.alpha)] * len(names)
    if len(alpha) != len(names):
        raise ValueError(f"alpha has {len(alpha)} coefficient(s) for {len(names)} specialist(s)")
    grid.validate(names)
    modalities = [n for n in names if n != "text"]
    missing = [m for m in modalities if not (Path(data_root) / m / grid.split).is_dir()]
    if missing:
        raise FileNotFoundError(f"no '{grid.split}' split for {missing} under {data_root} (the demo corpus writes one "
                                "with n_diag > 0)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".grid-fused-", dir=out))
    rows = []
    try:
        for s in settings(grid, names, alpha):
            one = dataclasses.replace(cfg, names=names, alpha=[s[n] for n in names], out=str(work / "fused"),
                                      overwrite=True, diagnose_only=False, progress=False, hash="none")
            fuse(one)
            res = evaluate_model(work / "fused", data_root, modalities=modalities, split=grid.split,
                                 batch_size=grid.batch_size, progress=False, max_samples=grid.max_samples)
            hit1 = {m: float(res[m][PRIMARY]) for m in modalities}
            rows.append({"alpha": s, "hit1": hit1, "score": score(hit1, grid.rule)})
            print("grid α " + " ".join(f"{n} {s[n]:g}" for n in names) + " → hit@1 "
                  + " ".join(f"{m} {v:.3f}" for m, v in hit1.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = max(range(len(rows)), key=lambda i: (rows[i]["score"], -i))  # ties: the first in grid order
    summary = {"split": grid.split, "max_samples": grid.max_samples, "rule": grid.rule, "metric": PRIMARY,
               "axes": grid.axes, "settings": rows, "best": rows[best]}
    atomic_write_text(out / "grid.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "grid.md", grid_markdown(summary))
    plot_grid(summary, out / "grid.png")
    return summary


def rule_text(rule: str) -> str:
    return ("the highest mean hit@1 over the modalities" if rule == "mean" else "the highest worst-modality hit@1") + \
        " (ties: the first in grid order)"


def grid_markdown(summary: dict[str, Any]) -> str:
    rows = summary["settings"]
    names = list(rows[0]["alpha"])
    mods = list(rows[0]["hit1"])
    lines = [f"α grid scored on the `{summary['split']}` split ({summary['max_samples']} samples per modality), hit@1 "
             f"text → media; best = {rule_text(summary['rule'])}.", "",
             "| " + " | ".join(f"α {n}" for n in names) + " | " + " | ".join(mods) + " | score |",
             "|" + "---:|" * (len(names) + len(mods) + 1)]
    for r in rows:
        mark = "**" if r == summary["best"] else ""
        lines.append("| " + " | ".join(f"{r['alpha'][n]:g}" for n in names) + " | "
                     + " | ".join(f"{r['hit1'][m]:.3f}" for m in mods) + f" | {mark}{r['score']:.3f}{mark} |")
    return "\n".join(lines) + "\n"


def plot_grid(summary: dict[str, Any], path: Path) -> Path:
    """Audio and mean vision hit@1 against α_audio, one pair of lines per α_vision (the paper's Fig. 3 view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["settings"]
    mods = list(rows[0]["hit1"])
    vis = [m for m in mods if m in VISUAL]
    key = lambda r: tuple(r["alpha"][m] for m in vis)  # noqa: E731  (the vision coefficients of a row)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, k in enumerate(dict.fromkeys(key(r) for r in rows)):
        sel = sorted((r for r in rows if key(r) == k), key=lambda r: r["alpha"].get("audio", 0.0))
        xs = [r["alpha"].get("audio", 0.0) for r in sel]
        label = "α vision " + "/".join(f"{v:g}" for v in dict.fromkeys(k))
        colour = f"C{i}"
        if "audio" in mods:
            ax.plot(xs, [r["hit1"]["audio"] for r in sel], "o-", color=colour, label=f"audio hit@1 ({label})")
        if vis:
            ax.plot(xs, [sum(r["hit1"][m] for m in vis) / len(vis) for r in sel], "s--", color=colour,
                    label=f"mean vision hit@1 ({label})")
    best = summary["best"]["alpha"]
    ax.axvline(best.get("audio", 0.0), color="grey", lw=0.8, ls=":", label="best by the rule")
    ax.set_xlabel("α audio")
    ax.set_ylabel(f"hit@1 text → media ({summary['split']} split)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("Fusion coefficients: audio vs vision")
    fig.tight_layout()
    return atomic_savefig(fig, path)
