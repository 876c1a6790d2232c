"""Task-vector diagnostics: norms, pairwise cosines, per-part and per-layer norms (json, text, plot)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_lightning.fusion.checkpoint import LAYER_RE
from omni_lightning.fusion.plan import Plan, TensorPlan

DIAGNOSTICS_JSON = "diagnostics.json"
DIAGNOSTICS_PNG = "diagnostics.png"


class _Stats:
    """Task-vector statistics accumulated chunk by chunk (float64 sums)."""

    def __init__(self, names: list[str]) -> None:
        M = len(names)
        self.names = names
        self.sumsq = [0.0] * M
        self.dot = [[0.0] * M for _ in range(M)]
        self.part: list[dict[str, float]] = [{} for _ in range(M)]
        self.layer: list[dict[str, dict[int, float]]] = [{} for _ in range(M)]
        self.numel = 0  # elements per task vector
        self._layers: dict[str, int | None] = {}

    def add(self, t: TensorPlan, gram: torch.Tensor) -> None:
        """Accumulate one chunk's Gram matrix of the task vectors (``gram[i, j] = Δ_i · Δ_j``)."""
        g = gram.double().tolist()
        M = len(g)
        layer = self._layers.get(t.name, -1)
        if layer == -1:
            m_ = LAYER_RE.search(t.name)
            layer = self._layers[t.name] = int(m_.group(1)) if m_ else None
        for i in range(M):
            s = g[i][i]
            self.sumsq[i] += s
            self.part[i][t.group] = self.part[i].get(t.group, 0.0) + s
            if layer is not None:
                lg = self.layer[i].setdefault(t.group, {})
                lg[layer] = lg.get(layer, 0.0) + s
            for j in range(i):
                self.dot[i][j] += g[i][j]
                self.dot[j][i] += g[i][j]

    def result(self) -> dict[str, Any]:
        norms = [math.sqrt(s) for s in self.sumsq]
        cos: dict[str, dict[str, float | None]] = {}
        for i, a in enumerate(self.names):
            cos[a] = {}
            for j, b in enumerate(self.names):
                if norms[i] == 0 or norms[j] == 0:
                    cos[a][b] = None
                else:
                    cos[a][b] = 1.0 if i == j else self.dot[i][j] / (norms[i] * norms[j])
        return {
            "norm": dict(zip(self.names, norms)),
            "cosine": cos,
            "part_norm": {n: {g: math.sqrt(v) for g, v in sorted(self.part[i].items())} for i, n in enumerate(self.names)},
            "layer_norm": {
                n: {g: [math.sqrt(d.get(k, 0.0)) for k in range(max(d) + 1)] for g, d in sorted(self.layer[i].items())}
                for i, n in enumerate(self.names)
            },
            "numel": self.numel,
        }


def _diagnostics(plan: Plan, engine: Any) -> dict[str, Any]:
    cfg = plan.cfg
    groups: dict[str, dict[str, int]] = {}
    for t in plan.tensors:
        groups.setdefault(t.rule, {"tensors": 0})
        groups[t.rule]["tensors"] += 1
    return {
        "method": cfg.method,
        "specialists": list(cfg.names),
        "alpha": dict(zip(cfg.names, cfg.alpha)),
        "task_vectors": engine.stats.result(),
        "tensors": dict(engine.counts, total=len(plan.tensors)),
        "rules": {r: g["tensors"] for r, g in sorted(groups.items())},
        "owners": dict(plan.owners),
        "files_from": plan.names[plan.file_owner],
        "warnings": plan.warnings + engine.warnings,
    }


def plot_diagnostics(diag: dict[str, Any], path: str | Path) -> Path:
    """Norms, cosine matrix and per-layer norms of the task vectors, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    tv = diag["task_vectors"]
    names = list(tv["norm"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.bar(names, [tv["norm"][n] for n in names], color="tab:blue")
    ax.set_title("task vector L2 norm")
    ax.tick_params(axis="x", rotation=30)
    ax = axes[1]
    mat = np.array([[np.nan if tv["cosine"][a][b] is None else tv["cosine"][a][b] for b in names] for a in names])
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_title("pairwise cosine")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    groups = sorted({g for n in names for g in tv["layer_norm"][n]})
    group = "language_model" if "language_model" in groups else (
        max(groups, key=lambda g: max(len(tv["layer_norm"][n].get(g, [])) for n in names)) if groups else None)
    if group is not None:
        for n in names:
            ys = tv["layer_norm"][n].get(group, [])
            ax.plot(range(len(ys)), ys, marker="o", label=n)
        ax.set_xlabel("layer")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend()
    ax.set_title(f"per-layer norm ({group})" if group else "per-layer norm (no layered tensors)")
    fig.suptitle(f"task vectors ({diag['method']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_diagnostics(diag: dict[str, Any]) -> str:
    tv = diag["task_vectors"]
    names = list(tv["norm"])
    w = max([10, *map(len, names)])
    lines = [f"task vectors over {tv['numel']:,} fused elements ({diag['method']})",
             f"{'specialist':<{w}}  {'alpha':>6}  {'L2 norm':>10}  " + "  ".join(f"{'cos ' + n:>{max(9, len(n) + 4)}}" for n in names)]
    for a in names:
        cells = []
        for b in names:
            c = tv["cosine"][a][b]
            cells.append(f"{'-' if c is None else f'{c:.4f}':>{max(9, len(b) + 4)}}")
        lines.append(f"{a:<{w}}  {diag['alpha'][a]:>6.3g}  {tv['norm'][a]:>10.4g}  " + "  ".join(cells))
    for a in names:
        for g, ys in tv["layer_norm"][a].items():
            if ys:
                lines.append(f"{a:<{w}}  per-layer norm {g}: " + " ".join(f"{y:.3g}" for y in ys))
    lines.append("tensors: " + ", ".join(f"{k} {v}" for k, v in diag["tensors"].items()))
    if diag["owners"]:
        lines.append("owners: " + ", ".join(f"{k} <- {v or 'base'}" for k, v in diag["owners"].items()))
    for wmsg in diag["warnings"]:
        lines.append(f"warning: {wmsg}")
    return "\n".join(lines)
