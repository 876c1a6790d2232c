"""The demo's figures over several seeds: mean and range per cell, and the recipe's checks on the mean.

One run's digits are not the finding (a single-thread run of the same demo moved single cells by up to 0.1), so
the README quotes the mean and range of this script:

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/seeds   # about 3 × the demo's time

Each seed runs the whole pipeline (configs/pipeline.yaml) with that seed for the base, the corpus and every
fit (``--base.seed``, ``--data.seed``, ``--budget.seed``) into ``OUT/seed<N>``; a finished seed is skipped by
the pipeline's own fingerprints. Writes ``OUT/seeds.md`` and ``OUT/seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "omni_lightning", "pipeline", "--config", str(REPO / "configs/pipeline.yaml"),
           "--out", str(out), "--base.seed", str(seed), "--data.seed", str(seed), "--budget.seed", str(seed), *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def summarise(reports: dict[int, dict], metric: str) -> dict:
    """{model: {modality: {mean, min, max}}} over the seeds' report.json results."""
    first = next(iter(reports.values()))["results"]
    table = {}
    for model, mods in first.items():
        table[model] = {}
        for m in mods:
            vals = [r["results"][model][m][metric] for r in reports.values() if m in r["results"].get(model, {})]
            table[model][m] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return table


def main() -> int:
    from omni_lightning.app.report import PRIMARY, pattern_checks  # the report's own checks, on the mean

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("extra", nargs="*", help="more pipeline flags, after --")
    args = p.parse_args()
    out = Path(args.out)
    seconds = {s: run_seed(s, out / f"seed{s}", args.extra) for s in args.seeds}
    reports = {s: json.loads((out / f"seed{s}" / "report.json").read_text()) for s in args.seeds}
    table = summarise(reports, PRIMARY)
    mods = [m for m in next(iter(table.values())) if m != "text"]
    mean = {model: {m: {PRIMARY: v["mean"]} for m, v in cells.items()} for model, cells in table.items()}
    ident = all((r.get("backbone_after_recovery") or {}).get("identical", True) for r in reports.values())
    checks = pattern_checks(mean, mods, ident)
    lines = [f"Mean [min – max] of {PRIMARY} (text → media, eval split) over seeds {args.seeds}; "
             "own-modality cells in bold.", "",
             "| model | " + " | ".join(mods) + " |", "|---|" + "---:|" * len(mods)]
    for model, cells in table.items():
        row = []
        for m in mods:
            c = cells.get(m)
            txt = "–" if c is None else f"{c['mean']:.3f} [{c['min']:.2f}–{c['max']:.2f}]"
            row.append(f"**{txt}**" if model == f"{m} specialist" else txt)
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    lines += ["", "| check (on the mean) | measured | met |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['measured']} | {'yes' if c['ok'] else '**no**'} |" for c in checks]
    lines += ["", "Pipeline seconds per seed: " + ", ".join(f"seed {s}: {t:.0f}" for s, t in seconds.items())]
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    (out / "seeds.json").write_text(json.dumps({"seeds": args.seeds, "metric": PRIMARY, "table": table,
                                                "checks": checks, "seconds": seconds}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
