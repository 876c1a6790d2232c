"""Fusion throughput and memory on synthetic checkpoints shaped like a ~1.5B-parameter LLM in bf16.

    .venv/bin/python benchmarks/fuse.py [--scale 1.0] [--dir /tmp/omni-fuse-bench] [--keep]

Writes a base and four specialists (two safetensors shards each) with Qwen2.5-1.5B's tensor shapes
(hidden 1536, MLP 8960, 28 layers, 12 query / 2 key-value heads, tied 151936-row embedding: 1.54 B
parameters, 3.1 GB per checkpoint). ``--scale`` shrinks the layer count and the vocabulary together (disk and
time are linear in it). Then, in one run:

* copy baseline: ``cat`` of every input file to /dev/null (after one warm-up pass, so inputs are read from
  the page cache where they fit, as the fuse will read them) + a plain ``dd`` write of the output's size
  (``conv=fsync``, like the fuse, which fsyncs its output before the final rename);
* ``omni-lightning fuse`` with task arithmetic and with TIES (density 0.2), each in its own subprocess:
  wall time and peak resident memory (``ru_maxrss`` of the child);
* the same task-arithmetic fuse on a model of half the tensors and the same largest tensor (only the first
  shard of every checkpoint): peak memory must not grow with the number of tensors.

Peak memory is the fuse process's own high-water mark (``VmHWM``; ``ru_maxrss`` of a child would also count
the parent's image between fork and exec). The checkpoints are written by a separate process. ``--repeats N``
runs each timing N times and reports the fastest (the machine's load average is printed: the ratio is only
meaningful on an otherwise idle machine).

Targets (issue 3): task arithmetic ≤ 2.5 × the copy time; peak memory ≤ 6 × the largest tensor in float32
+ 400 MB. Everything runs with the shipped defaults (sha256 of every input on, fsync on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from omni_lightning.fusion.checkpoint import Checkpoint

# Qwen2.5-1.5B
HIDDEN, MLP, LAYERS, VOCAB, KV = 1536, 8960, 28, 151936, 256
N_SPECIALISTS = 4


def shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (KV, HIDDEN), p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN), p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return s


def write_model(d: Path, spec: dict[str, tuple[int, ...]], pool: torch.Tensor, seed: int, base_seed: int = 0,
                delta: float = 0.0) -> None:
    """bf16 weights = 0.02 · pool slice at a per-tensor offset (+ delta · another slice for a specialist)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    names = sorted(spec)
    half = len(names) // 2
    groups = [names[:half], names[half:]]
    g = torch.Generator().manual_seed(seed)
    gb = torch.Generator().manual_seed(base_seed)
    weight_map = {}

    def take(gen, n):
        off = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        reps = (off + n) // pool.numel() + 1
        src = pool if reps == 1 else pool.repeat(reps)
        return src[off : off + n]

    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {}
        for name in group:
            shape = spec[name]
            n = int(torch.tensor(shape).prod())
            w = 0.02 * take(gb, n)
            if delta:
                w = w + delta * take(g, n)
            tensors[name] = w.reshape(shape).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        del tensors
    total = sum(int(torch.tensor(s).prod()) * 2 for s in spec.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": HIDDEN, "num_hidden_layers": len(
        {n.split(".")[2] for n in spec if n.startswith("model.layers.")})}))


def generate(root: Path, scale: float) -> None:
    layers = max(1, round(LAYERS * scale))
    vocab = max(1024, round(VOCAB * scale))
    spec = shapes(layers, vocab)
    torch.manual_seed(0)
    pool = torch.randn(1 << 26)
    write_model(root / "base", spec, pool, seed=0)
    for i in range(N_SPECIALISTS):
        write_model(root / f"spec{i}", spec, pool, seed=i + 1, delta=1e-3 * (i + 1))
    (root / f"ready-{layers}-{vocab}").write_text("ok")


def first_shard_only(src: Path, dst: Path) -> None:
    """A model of the first shard's tensors (half of them, the embedding included): symlinked, no copy."""
    dst.mkdir(parents=True, exist_ok=True)
    os.symlink(src / "model-00001-of-00002.safetensors", dst / "model.safetensors")
    shutil.copy(src / "config.json", dst / "config.json")


# runs `omni-lightning fuse ARGS` and prints the process's peak resident set (VmHWM) when it is done
FUSE_AND_REPORT = (
    "import sys\n"
    "from omni_lightning.app.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "print('VMHWM_KB', hwm)\n"
    "sys.exit(rc)\n"
)


def run_fuse(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one fuse in a fresh process."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FUSE_AND_REPORT, "fuse", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"fuse {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    hwm = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VMHWM_KB"))
    return wall, hwm * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 28 layers and 151936 rows (default 1)")
    ap.add_argument("--dir", default="/tmp/omni-fuse-bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints (reused by the next run)")
    ap.add_argument("--skip-ties", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="time each run N times, report the fastest")
    ap.add_argument("--hash", choices=["crc32", "sha256", "none"], default="crc32",
                    help="input content hash recorded by the fuse (default crc32, the shipped default)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "SCALE"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), float(args.generate[1]))
        return

    root = Path(args.dir)
    layers = max(1, round(LAYERS * args.scale))
    vocab = max(1024, round(VOCAB * args.scale))
    spec = shapes(layers, vocab)
    n_params = sum(int(torch.tensor(s).prod()) for s in spec.values())
    largest = max(int(torch.tensor(s).prod()) for s in spec.values())
    models = [root / "base", *(root / f"spec{i}" for i in range(N_SPECIALISTS))]
    stamp = root / f"ready-{layers}-{vocab}"
    if not stamp.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"writing 5 synthetic checkpoints: {n_params / 1e9:.2f} B params, {layers} layers, vocab {vocab} ...",
              flush=True)
        t = time.perf_counter()
        # in a child process, so this one stays small
        subprocess.run([sys.executable, __file__, "--generate", str(root), str(args.scale)], check=True)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    inputs = [f for d in models for f in sorted(d.glob("*.safetensors"))]
    in_bytes = sum(f.stat().st_size for f in inputs)
    out_bytes = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))

    load = os.getloadavg()
    # copy baseline (warm-up pass first)
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    t_cat = t_write = float("inf")
    blk = 16 << 20
    for _ in range(args.repeats):
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
        t_cat = min(t_cat, time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={root / 'write-test'}", f"bs={blk}", f"count={-(-out_bytes // blk)}",
                        "conv=fsync", "status=none"], check=True)
        t_write = min(t_write, time.perf_counter() - t)
        (root / "write-test").unlink()
    copy = t_cat + t_write

    common = ["--alpha", "0.3", "0.3", "0.3", "0.5", "--no-progress", "--overwrite", "--set", f"hash={args.hash}"]
    half = [root / "half" / d.name for d in models]
    if not (root / "half").is_dir():
        for src, dst in zip(models, half):
            first_shard_only(src, dst)
    runs = [("task_arithmetic", ["--method", "task_arithmetic"], models, args.repeats)]
    if not args.skip_ties:
        runs.append(("ties", ["--method", "ties", "--density", "0.2"], models, 1))
    runs.append(("task_arithmetic_half_tensors", ["--method", "task_arithmetic"], half, 1))
    budget = 6 * largest * 4 + 400e6
    results: dict = {
        "params": n_params, "layers": layers, "vocab": vocab, "scale": args.scale, "input_bytes": in_bytes,
        "output_bytes": out_bytes, "largest_tensor_fp32_bytes": largest * 4, "cat_s": t_cat, "write_s": t_write,
        "copy_s": copy, "cpus": os.cpu_count(), "loadavg_before": load, "rss_budget_bytes": budget, "hash": args.hash,
    }
    for label, extra, ms, reps in runs:
        out = root / f"out-{label}"
        fargs = ["--base", str(ms[0]), "--specialists", *map(str, ms[1:]), *common, *extra, "--out", str(out)]
        walls, rss = [], 0
        for _ in range(reps):
            print(f"fuse {label} ...", flush=True)
            wall, peak = run_fuse(fargs)
            walls.append(wall)
            rss = max(rss, peak)
        n_tensors = len(Checkpoint(ms[0], "base").tensors)
        results[label] = {"wall_s": min(walls), "walls_s": walls, "peak_rss_bytes": rss, "vs_copy": min(walls) / copy,
                          "rss_vs_budget": rss / budget, "tensors": n_tensors}
        shutil.rmtree(out, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()

    gb = 1e9
    print(f"\nsynthetic {n_params / 1e9:.2f} B-parameter bf16 LLM ({layers} layers, vocab {vocab}), base + "
          f"{N_SPECIALISTS} specialists, 2 shards each; {os.cpu_count()} CPUs; load average before "
          f"{load[0]:.2f}, after {results['loadavg_after'][0]:.2f}")
    print(f"inputs {in_bytes / gb:.2f} GB, output {out_bytes / gb:.2f} GB, largest tensor {largest * 4 / gb:.2f} GB fp32; "
          f"input hash {args.hash}")
    print(f"copy baseline: cat inputs {t_cat:.1f} s + write output (fsync) {t_write:.1f} s = {copy:.1f} s")
    print(f"{'run':<30} {'tensors':>8} {'wall s':>8} {'x copy':>7} {'peak RSS GB':>12} {'budget GB':>10}")
    for label, _, _, _ in runs:
        r = results[label]
        ratio = f"{r['vs_copy']:>7.2f}" if label != "task_arithmetic_half_tensors" else f"{'-':>7}"
        print(f"{label:<30} {r['tensors']:>8} {r['wall_s']:>8.1f} {ratio} {r['peak_rss_bytes'] / gb:>12.2f} "
              f"{budget / gb:>10.2f}")
    ta = results["task_arithmetic"]
    peak = max(results[label]["peak_rss_bytes"] for label, _, _, _ in runs)
    print(f"targets: task arithmetic {ta['vs_copy']:.2f}x copy (<= 2.5): {'PASS' if ta['vs_copy'] <= 2.5 else 'FAIL'}; "
          f"peak {peak / gb:.2f} GB <= {budget / gb:.2f} GB: {'PASS' if peak <= budget else 'FAIL'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
