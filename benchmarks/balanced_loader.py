"""Decoded samples/s: the balanced multi-modal loader vs one plain webdataset pipeline over the same shards.

    .venv/bin/python benchmarks/balanced_loader.py [--data DIR] [--batches 40] [--batch-size 48] [--rounds 3]

Both read the demo corpus's train shards (generated into a temporary folder unless ``--data`` names a corpus
root: 1200 samples per modality in 3 shards of 400), resample shards, shuffle with a 256-sample buffer and
decode every sample with the project's ``decode_sample``; neither collates (a batch is a list of decoded
samples), so the comparison is the sampler's own cost. The baseline is the canonical webdataset pipeline,
``wds.WebDataset(shards, resampled=True).shuffle(256).map(decode).batched(B)`` behind
``wds.WebLoader(...).with_epoch(N)``. The balanced loader is
:class:`~omni_lightning.data.balanced_sampler.BalancedStream` (one modality per batch, streams keyed by step
lane, positions and mix bookkeeping) in a plain ``DataLoader``. Each measurement is one pass of ``--batches``
batches of ``--batch-size``, with 0 and 2 DataLoader workers; rounds interleave the loaders (order alternating).

Two comparisons:

* **per modality** (the target): both loaders read one modality's shards, so they decode exactly the same
  kind and number of samples and the ratio isolates the sampler's cost; median over modalities and rounds.
* **all four modalities**: the balanced loader (equal weights) vs one plain pipeline over all 12 shards. The
  plain pipeline's modality mix is whatever shards it happened to draw (a few 400-sample shards per pass),
  and decode cost differs per modality (video frames cost most), so the raw ratio is confounded by the
  mix; a mix-adjusted ratio is printed too: the CPU the plain pipeline would need for the balanced run's
  mix (its per-modality cost from the first comparison) over the balanced run's CPU.

Throughput is given per CPU-second (the main process's CPU time plus its reaped DataLoader workers', from
``getrusage``), which neighbours on a shared machine do not inflate, and in wall-clock samples/s. Target:
balanced ≥ 0.9× plain.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _decode(raw):
    from omni_lightning.data.schema import decode_sample

    return decode_sample(raw, raw.get("__url__"))


def _as_list(samples):
    return samples


def _as_batch(samples, modality):
    return {"modality": modality, "size": len(samples), "samples": samples}


def _identity(x):
    return x


def plain_loader(urls: list[str], batch_size: int, batches: int, workers: int, seed: int, buffer: int = 256):
    import webdataset as wds

    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed, handler=wds.warn_and_continue)
          .shuffle(buffer).map(_decode).batched(batch_size, collation_fn=_as_list, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity).with_epoch(batches)


def balanced_loader(dirs: dict[str, str], batch_size: int, batches: int, workers: int, seed: int,
                    buffer: int = 256):
    from torch.utils.data import DataLoader

    from omni_lightning.data.balanced_sampler import BalancedSchedule, BalancedStream, resolve_weights

    mods = list(dirs)
    schedule = BalancedSchedule(mods, resolve_weights(mods), batch_size, seed)
    stream = BalancedStream(dirs, schedule, _as_batch, batches, seed, shuffle_buffer=buffer)
    stream.set_position(0, 0)
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity)


def measure(loader) -> tuple[int, float, float, dict[str, int]]:
    """(decoded samples, wall s, CPU s incl. reaped workers, samples per modality) for one full pass."""
    c0, t0 = _cpu(), time.perf_counter()
    it = iter(loader)
    per: dict[str, int] = {}
    for b in it:
        for s in (b["samples"] if isinstance(b, dict) else b):
            per[s["modality"]] = per.get(s["modality"], 0) + 1
    del it  # shuts the workers down so that their CPU time is reaped
    return sum(per.values()), time.perf_counter() - t0, _cpu() - c0, per


def _run(jobs, args, desc):
    """Interleaved rounds; returns {(key, workers): {"plain": [...], "balanced": [...]}}."""
    from tqdm.auto import tqdm

    out: dict = {}
    for r, key, w, plain_src, dirs in tqdm(jobs, desc=desc, unit="pair"):
        res = out.setdefault((key, w), {"plain": [], "balanced": []})
        for name in (["plain", "balanced"] if r % 2 == 0 else ["balanced", "plain"]):
            loader = (plain_loader(plain_src, args.batch_size, args.batches, w, r, args.shuffle_buffer)
                      if name == "plain" else
                      balanced_loader(dirs, args.batch_size, args.batches, w, r, args.shuffle_buffer))
            res[name].append(measure(loader))
    return out


def _ratios(res, i):  # i = 1: wall, 2: CPU; balanced throughput / plain throughput per round
    return [(b[0] / b[i]) / (p[0] / p[i]) for p, b in zip(res["plain"], res["balanced"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="corpus root with <modality>/train shards (default: demo corpus in a temp dir)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--shuffle-buffer", type=int, default=256, help="per stream (both loaders)")
    args = ap.parse_args()

    from omni_lightning.data.shards import read_index, split_dir

    tmp = tempfile.TemporaryDirectory()
    root = args.data
    if root is None:
        from omni_lightning.demo import make_demo_data

        root = str(Path(tmp.name) / "data")
        make_demo_data(root, n_train=1200, n_eval=0, progress=True)  # the demo defaults: 3 shards of 400
    mods = ["image", "video", "document", "audio"]
    dirs = {m: str(split_dir(root, m, "train")) for m in mods}
    urls = {m: read_index(dirs[m])["urls"] for m in mods}
    print(f"shards: {', '.join(f'{m} {len(u)}' for m, u in urls.items())}; {args.batches} batches x "
          f"{args.batch_size} per measurement; {args.rounds} interleaved rounds; workers {args.workers}")

    jobs = [(r, m, w, urls[m], {m: dirs[m]}) for r in range(args.rounds) for w in args.workers for m in mods]
    single = _run(jobs, args, "per modality")
    all_urls = [u for m in mods for u in urls[m]]
    jobs = [(r, "all", w, all_urls, dirs) for r in range(args.rounds) for w in args.workers]
    mixed = _run(jobs, args, "all modalities")

    print("\nper modality (same decode work): samples per CPU-s, plain -> balanced, ratio (median of rounds)")
    for w in args.workers:
        cells, ratios_cpu, ratios_wall = [], [], []
        for m in mods:
            res = single[(m, w)]
            rc, rw = _ratios(res, 2), _ratios(res, 1)
            ratios_cpu += rc
            ratios_wall += rw
            p = statistics.median(n / c for n, _, c, _ in res["plain"])
            b = statistics.median(n / c for n, _, c, _ in res["balanced"])
            cells.append(f"{m} {p:.0f}->{b:.0f} ({statistics.median(rc):.2f}x)")
        print(f"  workers={w}: " + "; ".join(cells))
        print(f"  workers={w}: median ratio per CPU-s {statistics.median(ratios_cpu):.2f}x "
              f"(rounds {min(ratios_cpu):.2f}-{max(ratios_cpu):.2f}); wall {statistics.median(ratios_wall):.2f}x")

    print("\nall four modalities: samples per CPU-s plain -> balanced, raw ratio, mix-adjusted ratio")
    for w in args.workers:
        res = mixed[("all", w)]
        # CPU-seconds per sample of each modality in the plain pipeline (medians from the per-modality runs)
        cost = {m: statistics.median(c / n for n, _, c, _ in single[(m, w)]["plain"]) for m in mods}
        adjusted = [sum(cost[m] * k for m, k in b[3].items()) / b[2] for b in res["balanced"]]
        p = statistics.median(n / c for n, _, c, _ in res["plain"])
        b = statistics.median(n / c for n, _, c, _ in res["balanced"])
        mix_p = res["plain"][0][3]
        print(f"  workers={w}: {p:.0f} -> {b:.0f}; raw {statistics.median(_ratios(res, 2)):.2f}x "
              f"(wall {statistics.median(_ratios(res, 1)):.2f}x); mix-adjusted {statistics.median(adjusted):.2f}x "
              f"(plain's mix in round 0: {mix_p}; balanced: {res['balanced'][0][3]})")
    tmp.cleanup()


if __name__ == "__main__":
    main()
