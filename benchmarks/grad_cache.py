"""GradCache vs the plain (uncached) loss: peak memory and step time, side by side in one run.

    .venv/bin/python benchmarks/grad_cache.py [--model DIR] [--repeats 3]

Each configuration runs in a fresh subprocess so peak memory is its own: on CUDA the allocator's peak,
on CPU the growth of the process's peak resident set over its level right before the first step. The model
is an embedded preset built in a temporary folder (``--preset small`` by default: ~30 M parameters, where
compute rather than per-call Python overhead dominates; on ``tiny`` the overhead of 2 × 16 extra calls
dominates a CPU step); the batch is audio–text
pairs (the heaviest modality of the demo corpus: audio encoder + projector + backbone). Reported:

* peak memory of GradCache at batch 256 (chunk 16) relative to the plain loss at batch 16 (target ≤ 1.25×),
* step time of GradCache relative to the plain loss at the same batch size (target ≤ 1.3×).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("plain", 16, None), ("grad_cache", 16, 16), ("plain", 256, None), ("grad_cache", 256, 16)]


def worker(model_dir: str, batch: int, chunk: int | None, repeats: int) -> dict:
    import resource

    import numpy as np
    import torch

    from omni_lightning.losses import ContrastiveLoss, grad_cache_step
    from omni_lightning.model import OmniEmbedder, OmniProcessor

    torch.manual_seed(0)
    model = OmniEmbedder.from_pretrained(model_dir).train()
    proc = OmniProcessor.from_pretrained(model_dir)
    loss_fn = ContrastiveLoss(temperature=0.05, symmetric=True)
    rng = np.random.default_rng(0)
    words = "one two three soft harsh beeps at pitch seven four five six".split()
    texts = [{"type": "text", "text": " ".join(rng.choice(words, 8))} for _ in range(batch)]
    audio = [{"type": "audio", "waveform": rng.standard_normal(16000).astype("float32"), "sample_rate": 16000}
             for _ in range(batch)]
    size = chunk or batch
    q = [proc(texts[i : i + size], "Retrieve the sound.") for i in range(0, batch, size)]
    p = [proc(audio[i : i + size], None) for i in range(0, batch, size)]
    params = [t for t in model.parameters() if t.requires_grad]

    def step() -> float:
        for t in params:
            t.grad = None
        if chunk is None:
            loss = loss_fn(torch.cat([model(c) for c in q]), torch.cat([model(c) for c in p]))
            loss.backward()
            return float(loss)
        return float(grad_cache_step(model, [q, p], loss_fn))

    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        q = [{k: v.cuda() for k, v in c.items()} for c in q]
        p = [{k: v.cuda() for k, v in c.items()} for c in p]
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # the first step sets the peak (and warms up)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"peak_bytes": max(peak - base, 1), "step_s": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a fresh embedded preset, see --preset)")
    ap.add_argument("--preset", default="small", help="embedded preset when --model is not given (tiny, small)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model_dir, batch, chunk = args.worker
        print(json.dumps(worker(model_dir, int(batch), None if chunk == "none" else int(chunk), args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from omni_lightning.demo import init_demo_model

            model_dir = str(init_demo_model(Path(tmp) / args.preset, preset=args.preset))
        res = {}
        for name, batch, chunk in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--worker", model_dir, str(batch),
                 str(chunk) if chunk else "none"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            res[(name, batch)] = json.loads(out)
            r = res[(name, batch)]
            print(f"{name:10s} batch {batch:4d}: peak +{r['peak_bytes'] / 2**20:8.1f} MiB  step {r['step_s']:.3f} s",
                  flush=True)
    mem = res[("grad_cache", 256)]["peak_bytes"] / res[("plain", 16)]["peak_bytes"]
    mem_plain = res[("plain", 256)]["peak_bytes"] / res[("plain", 16)]["peak_bytes"]
    t256 = res[("grad_cache", 256)]["step_s"] / res[("plain", 256)]["step_s"]
    t16 = res[("grad_cache", 16)]["step_s"] / res[("plain", 16)]["step_s"]
    print(f"\npeak memory, batch 256 / plain batch 16: GradCache {mem:.2f}x (target <= 1.25x), plain {mem_plain:.2f}x")
    print(f"step time, GradCache / plain at the same batch: {t256:.2f}x at 256, {t16:.2f}x at 16 (target <= 1.3x)")


if __name__ == "__main__":
    main()
