"""TIES and DARE+TIES against task arithmetic, and task arithmetic against the copy floor, side by side in one run.

    .venv/bin/python benchmarks/fuse_methods.py [--scale 0.1] [--repeats 2] [--specialists 2 4] [--dir DIR]
                                                [--keep] [--out JSON]

Synthetic bf16 checkpoints shaped like Qwen2.5-1.5B (``benchmarks/fuse.py``'s generator: two safetensors shards
each; ``--scale`` shrinks the layer count and the vocabulary together — 0.1 gives 3 layers, a 15194-row
embedding, 164 M parameters, 0.33 GB per checkpoint). For base + M specialists (each M of ``--specialists``),
in one run and in this order, each repeated ``--repeats`` times (the minimum is reported):

* the copy floor: ``cat`` of every input to /dev/null (after a warm-up pass: the fuse also reads from the page
  cache) + ``dd conv=fsync`` of the output's size (the fuse fsyncs its output);
* ``omni-lightning fuse`` with task arithmetic, TIES (density 0.2) and DARE (p 0.1) + TIES, each in a fresh
  process (wall time, CPU seconds of the process — user + system, all threads — and its own peak RSS, VmHWM),
  with the shipped defaults (CRC32 input hashes, fsync). CPU seconds are what other jobs on a shared machine do
  not inflate; the wall-time ratios are the targets.

Targets (issue 19): TIES and DARE+TIES ≤ 3 × task arithmetic; task arithmetic ≤ 2.5 × the copy floor at
base + 4; peak memory of task arithmetic flat in the number of specialists. The machine's load average is
printed before and after: on a shared machine only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuse as fb  # noqa: E402  (benchmarks/fuse.py: the checkpoint generator and the fuse runner)

METHODS = {
    "task_arithmetic": ["--method", "task_arithmetic"],
    "ties": ["--method", "ties", "--ties.density", "0.2"],
    "dare_ties": ["--method", "dare", "--dare.p", "0.1", "--dare.combine", "ties", "--ties.density", "0.2"],
}
ALPHAS = [0.3, 0.3, 0.3, 0.5]


def copy_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float]:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    t_cat = time.perf_counter() - t
    blk = 16 << 20
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={scratch}", f"bs={blk}", f"count={-(-out_bytes // blk)}",
                    "conv=fsync", "status=none"], check=True)
    t_write = time.perf_counter() - t
    scratch.unlink()
    return t_cat, t_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.1, help="fraction of Qwen2.5-1.5B's layers and vocabulary")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--specialists", type=int, nargs="+", default=[2, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--dir", default="/tmp/omni-fuse-methods-bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints (reused by the next run)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    root = Path(args.dir)
    layers = max(1, round(fb.LAYERS * args.scale))
    vocab = max(1024, round(fb.VOCAB * args.scale))
    stamp = root / f"ready-{layers}-{vocab}"
    if not stamp.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"writing 5 synthetic checkpoints ({layers} layers, vocab {vocab}) ...", flush=True)
        subprocess.run([sys.executable, fb.__file__, "--generate", str(root), str(args.scale)], check=True)
    models = [root / "base", *(root / f"spec{i}" for i in range(fb.N_SPECIALISTS))]
    out_bytes = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    n_params = out_bytes // 2
    results: dict = {"scale": args.scale, "params": n_params, "layers": layers, "vocab": vocab,
                     "checkpoint_bytes": out_bytes, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                     "runs": {}}
    for M in args.specialists:
        ms = models[: M + 1]
        inputs = [f for d in ms for f in sorted(d.glob("*.safetensors"))]
        subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)  # warm-up
        r: dict = {"copy_s": [], "cat_s": [], "write_s": []}
        common = ["--base", str(ms[0]), "--specialists", *map(str, ms[1:]), "--alpha", *map(str, ALPHAS[:M]),
                  "--no-progress", "--overwrite"]
        for label in args.methods:
            r[label] = {"wall_s": [], "cpu_s": [], "peak_rss_bytes": 0}
        for rep in range(args.repeats):  # interleaved: every repeat measures every run under similar load
            t_cat, t_write = copy_floor(inputs, out_bytes, root / "write-test")
            r["cat_s"].append(t_cat)
            r["write_s"].append(t_write)
            r["copy_s"].append(t_cat + t_write)
            for label in args.methods:
                print(f"base + {M}: {label} (repeat {rep + 1}) ...", flush=True)
                out = root / f"out-{label}"
                ru = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall, peak = fb.run_fuse([*common, *METHODS[label], "--out", str(out)])
                ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r[label]["wall_s"].append(wall)
                r[label]["cpu_s"].append(ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime)
                r[label]["peak_rss_bytes"] = max(r[label]["peak_rss_bytes"], peak)
                shutil.rmtree(out, ignore_errors=True)
        results["runs"][M] = r
    results["loadavg_after"] = os.getloadavg()

    gb = 1e9
    print(f"\nsynthetic {n_params / 1e9:.2f} B-parameter bf16 LLM ({layers} layers, vocab {vocab}; "
          f"{out_bytes / gb:.2f} GB per checkpoint, 2 shards); {os.cpu_count()} CPUs; load average before "
          f"{results['loadavg_before'][0]:.2f}, after {results['loadavg_after'][0]:.2f}; minimum of {args.repeats}")
    print(f"{'inputs':<10} {'run':<16} {'wall s':>8} {'x copy':>8} {'x TA':>7} {'CPU s':>7} {'CPU x TA':>9} "
          f"{'peak RSS GB':>12}")
    for M, r in results["runs"].items():
        copy = min(r["copy_s"])
        print(f"{'base + ' + str(M):<10} {'copy floor':<16} {copy:>8.2f} {1:>8.2f}")
        ta = min(r["task_arithmetic"]["wall_s"]) if "task_arithmetic" in r else float("nan")
        ta_cpu = min(r["task_arithmetic"]["cpu_s"]) if "task_arithmetic" in r else float("nan")
        for label in args.methods:
            w, c = min(r[label]["wall_s"]), min(r[label]["cpu_s"])
            r[label]["vs_copy"], r[label]["vs_task_arithmetic"] = w / copy, w / ta
            r[label]["cpu_vs_task_arithmetic"] = c / ta_cpu
            print(f"{'':<10} {label:<16} {w:>8.2f} {w / copy:>8.2f} {w / ta:>7.2f} {c:>7.1f} {c / ta_cpu:>9.2f} "
                  f"{r[label]['peak_rss_bytes'] / gb:>12.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
