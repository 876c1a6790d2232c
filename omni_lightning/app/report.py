"""The pipeline's report: every phase's model on every modality, and the evidence of Projector Drift.

``report.md`` — the ablation table (rows = models, columns = modalities; hit@1 text → media on the eval split,
then MMEB-style pool Hit@1 and nDCG@10), each modality's path base → specialist → fused → recovered → final
with the recipe's expectations checked, the fusion diagnostics (task-vector norms and cosines), projector
drift of the audio models against the audio specialist, whether recovery left the backbone bit-identical,
the joint-training baselines, the α grid (scored on the diagnostic split) and the stage timings.
``report.json`` — all of it, machine-readable. ``report.png`` — grouped bars per modality (base, own
specialist, fused, recovered, final, joint baselines): the drop of the audio bar after fusion and its return
after recovery are visible at a glance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omni_lightning.evaluation.drift import load_pairs, measure_drift
from omni_lightning.modalities import VISUAL
from omni_lightning.model.config import OmniConfig
from omni_lightning.model.omni import load_model_and_processor, weight_files
from omni_lightning.utils import atomic_savefig, atomic_write_text

PRIMARY = "q2c_hit1"  # hit@1 text → media: the headline of the report and the α grid
STAGE_ROWS = ("base", "specialist", "fused", "recovered", "final (rehearsed)")


def joint_rows(results: dict[str, dict]) -> list[str]:
    return [r for r in results if r.startswith("joint:")]


def own_path(results: dict[str, dict], modality: str) -> dict[str, float | None]:
    """hit@1 of ``modality`` along the recipe — base, its own specialist, fused, recovered, final — and in each
    joint-training baseline."""
    def get(row: str) -> float | None:
        return results.get(row, {}).get(modality, {}).get(PRIMARY)

    return {"base": get("base"), "specialist": get(f"{modality} specialist"), "fused": get("fused"),
            "recovered": get("recovered"), "final (rehearsed)": get("final (rehearsed)"),
            **{r: get(r) for r in joint_rows(results)}}


def chance(data_root: Path, modality: str) -> float | None:
    """hit@1 of a random ranking on the demo corpus's eval split: 1 / the number of distinct captions (None when the
    data root is not a demo corpus)."""
    manifest = Path(data_root) / "demo.json"
    if not manifest.is_file():
        return None
    n = json.loads(manifest.read_text()).get("modalities", {}).get(modality, {}).get("eval", {}).get("num_labels")
    return 1.0 / n if n else None


def pattern_checks(results: dict[str, dict], modalities: list[str], backbone_identical: bool | None) -> list[dict]:
    """The recipe's expected pattern on the eval split, each with the measured numbers and a verdict."""
    checks = []
    vision = [m for m in modalities if m != "audio"]
    paths = {m: own_path(results, m) for m in modalities + ["audio"]}
    for m in modalities:
        p = paths[m]
        if p["base"] is not None and p["specialist"] is not None:
            checks.append({"check": f"{m} specialist reaches ≥ 0.5 hit@1 (and beats the base by ≥ 0.2)",
                           "measured": f"{p['base']:.3f} → {p['specialist']:.3f}",
                           "ok": p["specialist"] >= 0.5 and p["specialist"] - p["base"] >= 0.2})
    for m in vision:
        p = paths[m]
        if None not in (p["base"], p["specialist"], p["fused"]) and p["specialist"] > p["base"]:
            kept = (p["fused"] - p["base"]) / (p["specialist"] - p["base"])
            checks.append({"check": f"fusion keeps ≥ 60 % of the {m} specialist's gain over the base",
                           "measured": f"fused {p['fused']:.3f}: {100 * kept:.0f} % of the gain", "ok": kept >= 0.6})
    a = paths["audio"]
    if None not in (a["specialist"], a["fused"]):
        checks.append({"check": "Projector Drift: fused audio ≥ 0.2 hit@1 below the audio specialist",
                       "measured": f"{a['specialist']:.3f} → {a['fused']:.3f} ({a['fused'] - a['specialist']:+.3f})",
                       "ok": a["specialist"] - a["fused"] >= 0.2})
    if None not in (a["specialist"], a["recovered"]):
        checks.append({"check": "recovery brings audio within 0.03 hit@1 of the specialist",
                       "measured": f"{a['recovered']:.3f} vs {a['specialist']:.3f}",
                       "ok": a["recovered"] >= a["specialist"] - 0.03})
    same = [results.get("fused", {}).get(m) == results.get("recovered", {}).get(m) for m in vision
            if m in results.get("recovered", {})]
    if same:
        checks.append({"check": "recovery leaves vision unchanged (every vision metric equal; backbone bit-identical)",
                       "measured": f"metrics equal: {all(same)}; backbone bit-identical: {backbone_identical}",
                       "ok": all(same) and backbone_identical is not False})
    start = "recovered" if "recovered" in results else "fused"  # the model rehearsal started from
    changes = [(paths[m]["final (rehearsed)"] - paths[m][start], m) for m in modalities
               if None not in (paths[m]["final (rehearsed)"], paths[m][start])]
    if changes:
        worst = min(changes)
        checks.append({"check": f"rehearsal keeps every modality at or near (within 0.05) its {start} value",
                       "measured": f"smallest change {worst[0]:+.3f} ({worst[1]})", "ok": worst[0] >= -0.05})
    gaps = [(paths[m]["final (rehearsed)"] - paths[m]["specialist"], m) for m in modalities
            if None not in (paths[m]["final (rehearsed)"], paths[m]["specialist"])]
    if gaps:
        worst = min(gaps)
        checks.append({"check": "the final model is within 0.10 hit@1 of each specialist on its own modality",
                       "measured": f"largest shortfall {worst[0]:+.3f} ({worst[1]})", "ok": worst[0] >= -0.10})
    return checks


def overlap_checks(tv: dict[str, Any]) -> list[dict]:
    """What fusion relies on: the visual task vectors share a direction, the audio one is orthogonal to them."""
    names = list(tv["norm"])
    vis = [n for n in names if n in VISUAL]
    pairs = [(a, b) for i, a in enumerate(vis) for b in vis[i + 1:] if tv["cosine"][a][b] is not None]
    out = []
    if pairs:
        cos = {f"{a}·{b}": tv["cosine"][a][b] for a, b in pairs}
        out.append({"check": "the visual task vectors overlap (every pairwise cosine ≥ 0.2)",
                    "measured": ", ".join(f"{k} {v:.3f}" for k, v in cos.items()), "ok": min(cos.values()) >= 0.2})
    if "audio" in names and vis:
        cos = {n: tv["cosine"]["audio"][n] for n in vis if tv["cosine"]["audio"][n] is not None}
        if cos:
            out.append({"check": "the audio task vector is near-orthogonal to the visual ones (|cosine| ≤ 0.05)",
                        "measured": ", ".join(f"audio·{k} {v:.3f}" for k, v in cos.items()),
                        "ok": max(map(abs, cos.values())) <= 0.05})
    return out


def backbone_identical(fused: Path, recovered: Path) -> dict[str, Any]:
    """Compare every tensor outside the projector, one at a time (bounded memory)."""
    import torch
    from safetensors import safe_open


    prefix = OmniConfig.load(recovered).parts["projector"]

    def tensors(d: Path) -> dict[str, Path]:
        out = {}
        for f in weight_files(d):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = tensors(fused), tensors(recovered)
    if set(a) != set(b):
        return {"identical": False, "reason": "different tensor names"}
    changed, projector_changed = [], []
    for k in sorted(a):
        with safe_open(str(a[k]), "pt") as fa, safe_open(str(b[k]), "pt") as fb:
            same = torch.equal(fa.get_tensor(k), fb.get_tensor(k))
        if not same:
            (projector_changed if k.startswith(prefix) else changed).append(k)
    return {"identical": not changed, "changed_outside_projector": changed[:20],
            "projector_tensors_changed": len(projector_changed), "tensors": len(a)}


DRIFT_MODELS = ("audio specialist", "fused", "recovered", "final (rehearsed)")  # the drift table's rows


def drift_rows(models: dict[str, Path], data_root: Path, reference: Path, max_samples: int = 256) -> dict[str, dict]:

    samples = load_pairs(data_root, "eval", max_samples)
    ref, ref_proc = load_model_and_processor(reference)
    rows = {}
    for name, d in models.items():
        model, proc = load_model_and_processor(d)
        rows[name] = measure_drift(model, proc, samples, ref, ref_proc)
    return rows


def plot_report(results: dict[str, dict], modalities: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in (*STAGE_ROWS, *joint_rows(results)) if any(own_path(results, m)[r] is not None
                                                                  for m in modalities)]
    colours = {"base": "#9e9e9e", "specialist": "#1f77b4", "fused": "#d62728", "recovered": "#2ca02c",
               "final (rehearsed)": "#9467bd"}
    colours.update({r: c for r, c in zip(joint_rows(results), ("#ff7f0e", "#8c564b", "#e377c2"))})
    x = np.arange(len(modalities))
    w = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.9 * len(modalities) + 3, 4.2))
    for i, r in enumerate(rows):
        ys = [own_path(results, m)[r] for m in modalities]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * w, [np.nan if y is None else y for y in ys], w,
                      label=r if r != "specialist" else "own specialist", color=colours[r])
        for b, y in zip(bars, ys):
            if y is not None:
                ax.text(b.get_x() + b.get_width() / 2, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, modalities)
    ax.set_ylabel("hit@1, text → media (eval split)")
    ax.set_ylim(0, 1.08)
    ax.set_title("Each modality along the recipe: specialist → fusion (Projector Drift) → recovery → rehearsal")
    ax.legend(ncol=min(len(rows), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False, fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def _table(results: dict[str, dict], modalities: list[str], metric: str) -> str:
    lines = ["| model | " + " | ".join(modalities) + " |", "|---|" + "---:|" * len(modalities)]
    for name, res in results.items():
        cells = []
        for m in modalities:
            v = res.get(m, {}).get(metric)
            own = name == f"{m} specialist"
            cells.append("–" if v is None else (f"**{v:.3f}**" if own else f"{v:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(pipe, results: dict[str, dict], drift: dict[str, dict]) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``report.png`` under the pipeline's output folder, from the eval
    ``results`` and the ``drift`` table (:func:`drift_rows`) the pipeline computed."""
    out: Path = pipe.out
    mods = [m for m in pipe.cfg.eval.modalities if any(m in r for r in results.values())]
    recipe_mods = [m for m in mods if m != "text"]
    main_rows = results
    grid_path = out / "grid" / "grid.json"
    grid = json.loads(grid_path.read_text()) if grid_path.is_file() and any(s.name == "grid" for s in pipe.stages) else None

    ident = None
    recovered = pipe.models().get("recovered")
    if recovered is not None and (out / "fused").is_dir() and recovered.is_dir():
        ident = backbone_identical(out / "fused", recovered)
    diag_path = out / "fused" / "diagnostics.json"
    diag = json.loads(diag_path.read_text()) if diag_path.is_file() else None
    checks = pattern_checks(main_rows, recipe_mods, None if ident is None else ident["identical"])
    chances = {m: c for m in recipe_mods if (c := chance(pipe.data_root, m)) is not None}
    if chances:
        checks.append({"check": "chance hit@1 ≤ 0.03 on every modality (1 / distinct eval captions)",
                       "measured": ", ".join(f"{m} {c:.3f}" for m, c in chances.items()),
                       "ok": max(chances.values()) <= 0.03})
    if diag:
        checks += overlap_checks(diag["task_vectors"])
    timings = {}
    for stage in pipe.stages:  # the current plan's stages (records of stages since dropped from the config stay out)
        rec = out / ".pipeline" / f"{stage.name}.json"
        if rec.is_file():
            timings[stage.name] = json.loads(rec.read_text())["seconds"]

    md = ["# omni-lightning pipeline report", "",
          f"Models under `{out}`, data `{pipe.data_root}`, eval split. Own-modality cells of each specialist in bold.",
          "", "## hit@1, text query → media", "", _table(main_rows, mods, PRIMARY), "",
          "![report](report.png)", "",
          "## MMEB-style Hit@1 (own positive against a pool of "
          f"{pipe.cfg.eval.pool_size} candidates)", "", _table(main_rows, mods, "pool_hit1"), "",
          "## nDCG@10, text → media", "", _table(main_rows, mods, "q2c_ndcg10"), "",
          "## The recipe's pattern", "", "| modality | " + " | ".join((*STAGE_ROWS, *joint_rows(main_rows))) + " |",
          "|---|" + "---:|" * (len(STAGE_ROWS) + len(joint_rows(main_rows)))]
    for m in recipe_mods:
        p = own_path(main_rows, m)
        md.append(f"| {m} | " + " | ".join("–" if p[r] is None else f"{p[r]:.3f}" for r in p) + " |")
    md += ["", "| expectation | measured | met |", "|---|---|---|"]
    md += [f"| {c['check']} | {c['measured']} | {'yes' if c['ok'] else '**no**'} |" for c in checks]
    if diag:
        tv = diag["task_vectors"]
        names = list(tv["norm"])
        md += ["", "## Fusion diagnostics", "",
               f"{diag['method']}, α = " + ", ".join(f"{n} {diag['alpha'][n]:g}" for n in names), "",
               "| task vector | L2 norm | " + " | ".join(f"cos {n}" for n in names) + " |",
               "|---|---:|" + "---:|" * len(names)]
        for a in names:
            cos = [tv["cosine"][a][b] for b in names]
            md.append(f"| {a} | {tv['norm'][a]:.3g} | " + " | ".join("–" if c is None else f"{c:.4f}" for c in cos) + " |")
        lm = {n: tv["layer_norm"][n].get("language_model", []) for n in names}
        if any(lm.values()):
            md += ["", "Per-layer norm (language model): " + "; ".join(
                f"{n} " + " ".join(f"{y:.3g}" for y in ys) for n, ys in lm.items() if ys)]
    if drift:
        keys = ["t2a_r1", "a2t_r1", "ref_cosine", "norm_ratio", "sliced_w1"]
        md += ["", "## Projector drift (audio eval pairs; reference = the audio specialist)", "",
               "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, row in drift.items():
            md.append(f"| {name} | " + " | ".join("–" if row.get(k) is None else f"{row[k]:.3f}" for k in keys) + " |")
    if ident is not None:
        md += ["", f"Backbone and audio encoder after recovery: "
               f"{'bit-identical to the fused model' if ident['identical'] else 'CHANGED: ' + ', '.join(ident['changed_outside_projector'])}"
               f" ({ident['tensors']} tensors compared; {ident['projector_tensors_changed']} projector tensors changed)."]
    if grid:
        md += ["", "## α grid (fusion coefficients) on the diagnostic split", "", (out / "grid" / "grid.md").read_text().rstrip(), "",
               "![α grid](grid/grid.png)"]
    if timings:
        md += ["", "## Stage times (s, last run of each stage)", "", "| stage | s |", "|---|---:|"]
        md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    md.append("")

    report = {"results": results, "pattern": checks, "backbone_after_recovery": ident, "drift": drift, "grid": grid,
              "fusion": diag and {k: diag[k] for k in ("method", "alpha", "task_vectors")}, "stage_seconds": timings}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_report(main_rows, recipe_mods, out / "report.png")

    print("\n" + "\n".join(md[4:7]))
    print("\n" + "\n".join(l for l in md if l.startswith("| expectation") or l.startswith("|---|---|---|")
                           or any(l.startswith(f"| {c['check']}") for c in checks)))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'}")
    return report
