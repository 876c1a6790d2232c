"""The balanced multi-modal sampler: schedule, weights, mix, exact batch counts, resume, skips, errors, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import corrupt_member

from omni_lightning.data.balanced_sampler import (
    BalancedSchedule,
    BalancedStream,
    StreamProgress,
    modality_for_step,
    resolve_weights,
    stable_seed,
    temperature_weights,
)
from omni_lightning.data.datamodule import OmniDataModule
from omni_lightning.data.shards import write_shards

MODS = ["image", "video", "document", "audio"]
# uneven corpora: (samples, samples per shard) -> 3, 1, 3 and 2 shards
SIZES = {"image": (60, 20), "video": (24, 24), "document": (36, 12), "audio": (16, 8)}


def _samples(modality: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"task": "t", "modality": modality, "instruction": "", "query": {"type": "text", "text": f"{modality} {i}"},
             "pos": {"type": "image", "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)}, "label": str(i)}
            for i in range(n)]


@pytest.fixture(scope="module")
def uneven_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    for i, (m, (n, per)) in enumerate(SIZES.items()):
        write_shards(_samples(m, n, i), root, m, "train", max_per_shard=per)
        write_shards(_samples(m, 8, 10 + i), root, m, "eval", max_per_shard=8)
    return root


def _dirs(root, mods=MODS):
    return {m: str(Path(root) / m / "train") for m in mods}


def _keys(samples, m):
    return {"modality": m, "size": len(samples), "keys": [s["key"] for s in samples]}


def _stream(root, probs, batch_size=4, steps=10, seed=0, mixed=False, shuffle=8, mods=MODS):
    sched = BalancedSchedule(mods, probs, batch_size, seed, mixed)
    return BalancedStream(_dirs(root, mods), sched, _keys, steps, seed, shuffle)


def _pairs(batch):
    """(modality, key) of every sample of a batch (mixed batches: over their parts)."""
    parts = batch.get("parts", [batch])
    return [(p["modality"], k) for p in parts for k in p["keys"]]


# ------------------------------------------------------------------------------------------------ weights


def test_temperature_weights_match_hand_formula(uneven_root):
    sizes = {m: n for m, (n, _) in SIZES.items()}
    for T in (0.5, 1.0, 2.0, 10.0):
        got = temperature_weights(sizes, T)
        raw = {m: n ** (1.0 / T) for m, n in sizes.items()}
        for m in MODS:
            assert got[m] == pytest.approx(raw[m] / sum(raw.values()), rel=1e-12)
    assert temperature_weights(sizes, 1.0)["image"] == pytest.approx(60 / 136)
    assert max(temperature_weights(sizes, 1e6).values()) == pytest.approx(0.25, abs=1e-5)
    assert temperature_weights({"image": 10**9, "audio": 1}, 0.01)["image"] == 1.0  # no overflow
    # through the datamodule: sizes come from each modality's index.json
    dm = OmniDataModule(str(uneven_root), MODS, size_temperature=2.0, model="unused", batch_size=4,
                        steps_per_epoch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    hand = {m: math.sqrt(n) for m, n in sizes.items()}
    assert dm.probs == pytest.approx({m: hand[m] / sum(hand.values()) for m in MODS}, rel=1e-12)
    assert resolve_weights(MODS, {"image": 2, "video": 2, "document": 4, "audio": 8}) == \
        {"image": 0.125, "video": 0.125, "document": 0.25, "audio": 0.5}
    assert resolve_weights(MODS) == {m: 0.25 for m in MODS}


def test_observed_mix_within_binomial_bound(uneven_root):
    probs = resolve_weights(MODS, {"image": 1, "video": 2, "document": 3, "audio": 4})
    N = 600
    ds = _stream(uneven_root, probs, batch_size=1, steps=N, shuffle=0)
    ds.set_position(0, 0)
    progress = StreamProgress(ds.schedule, N, 1)
    counts: Counter = Counter()
    for batch in ds:
        progress.observe(batch["stream"])
        assert len(batch["keys"]) == 1
        counts[batch["modality"]] += 1  # what the loader actually produced
    assert sum(counts.values()) == N
    for m in MODS:
        p = probs[m]
        bound = 4 * math.sqrt(p * (1 - p) / N)  # 4 sigma of the binomial share
        assert abs(counts[m] / N - p) <= bound, (m, counts[m] / N, p, bound)
    # the main-process accounting the module logs as <phase>/mix/<modality> equals the observed shares
    assert progress.mix_fractions() == {m: counts[m] / N for m in MODS}
    # and the schedule is the pure function of (seed, step) (independent re-computation)
    w = [probs[m] for m in MODS]
    redo = Counter(random.Random(stable_seed("modality-schedule", 0, s)).choices(MODS, weights=w)[0] for s in range(N))
    assert redo == counts


def test_mixed_batches_split_by_weight(uneven_root):
    probs = resolve_weights(MODS, {"image": 1, "video": 1, "document": 1, "audio": 2})  # B*p = 1.4,1.4,1.4,2.8
    sched = BalancedSchedule(MODS, probs, 7, seed=3, mixed=True)
    N = 2000
    totals = Counter()
    for s in range(N):
        comp = sched.composition(s)
        assert sum(comp.values()) == 7
        for m in MODS:  # each count is floor or ceil of its quota
            assert math.floor(7 * probs[m]) <= comp.get(m, 0) <= math.ceil(7 * probs[m])
        totals.update(comp)
        assert comp == BalancedSchedule(MODS, probs, 7, seed=3, mixed=True).composition(s)  # pure in (seed, s)
    for m in MODS:  # expected share exactly p_m; remainders are Bernoulli(frac) per step
        frac = 7 * probs[m] - math.floor(7 * probs[m])
        bound = 4 * math.sqrt(frac * (1 - frac) * N) / (7 * N)
        assert abs(totals[m] / (7 * N) - probs[m]) <= bound
    ds = _stream(uneven_root, probs, batch_size=7, steps=6, mixed=True)
    ds.set_position(0, 0)
    batches = list(ds)
    assert len(batches) == 6
    for b in batches:
        assert b["modality"] == "mixed" and b["size"] == 7
        assert {p["modality"]: p["size"] for p in b["parts"]} == b["stream"]["composition"]
        assert [p["modality"] for p in b["parts"]] == [m for m in MODS if m in b["stream"]["composition"]]


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("num_workers,offset,mixed", [(1, 7, False), (3, 5, False), (2, 3, True)])
def test_stream_resume_at_any_offset_is_exact(uneven_root, num_workers, offset, mixed):
    """Simulates a DataLoader with W workers (worker w yields loader batches w, w+W, ...) in-process."""
    from unittest import mock

    probs = resolve_weights(MODS)
    steps = 12

    def run(start, rank=0):
        ds = _stream(uneven_root, probs, steps=steps, mixed=mixed)
        ds.set_position(2, start, rank=rank, world_size=2)
        per_worker = []
        for w in range(num_workers):
            info = mock.Mock(id=w, num_workers=num_workers)
            with mock.patch("omni_lightning.data.balanced_sampler.get_worker_info", return_value=info):
                per_worker.append(list(ds))
        order = []  # the DataLoader's in-order interleaving
        for i in range(steps - start):
            order.append(per_worker[i % num_workers][i // num_workers])
        return order

    full, resumed = run(0), run(offset)
    assert [b["stream"]["local"] for b in full] == list(range(steps))
    assert [b["stream"]["local"] for b in resumed] == list(range(offset, steps))
    assert [_pairs(b) for b in resumed] == [_pairs(b) for b in full[offset:]]
    assert [b["stream"]["lane"] for b in resumed] == [s % num_workers for s in range(offset, steps)]
    # the other rank: the same schedule, its own samples
    other = run(0, rank=1)
    assert [b["stream"]["composition"] for b in other] == [b["stream"]["composition"] for b in full]
    assert [_pairs(b) for b in other] != [_pairs(b) for b in full]


def test_corrupt_samples_are_skipped_counted_and_resume_stays_exact(tmp_path):
    root = tmp_path / "data"
    write_shards(_samples("image", 30, 0), root, "image", "train", max_per_shard=10)
    write_shards(_samples("audio", 20, 1), root, "audio", "train", max_per_shard=10)
    bad = set()
    for shard in sorted((root / "image" / "train").glob("*.tar")):
        with tarfile.open(shard) as tf:
            keys = sorted({n.split(".")[0] for n in tf.getnames()})
        for k in keys[::3]:  # every third image sample does not decode
            corrupt_member(shard, f"{k}.pos.png")
            bad.add(k)
    probs = resolve_weights(["image", "audio"])
    steps, offset = 10, 6

    def stream():
        return _stream(root, probs, batch_size=5, steps=steps, mods=["image", "audio"])

    ds = stream()
    ds.set_position(0, 0)
    progress = StreamProgress(ds.schedule, steps, 1)
    full = []
    for batch in ds:
        progress.observe(batch["stream"])
        full.append(batch)
        if len(full) == offset:
            state = progress.state_dict()  # a checkpoint after `offset` trained batches
    image_keys = [k for b in full for m, k in _pairs(b) if m == "image"]
    assert image_keys and not set(image_keys) & bad  # corrupt samples never reach a batch
    assert all(b["size"] == 5 for b in full)  # ... and batches stay full
    assert progress.skipped > 0 and full[-1]["stream"]["skipped"] == progress.skipped
    assert state["next"] == offset and sum(state["extras"][0].values()) > 0  # failed decodes were consumed

    fresh = StreamProgress(ds.schedule, steps, 1)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    epoch, start, extras = fresh.begin_epoch(trainer_epoch=0, rank=0, world_size=1)
    assert (epoch, start) == (0, offset)
    resumed = stream()
    resumed.set_position(epoch, start, extras=extras)
    assert [_pairs(b) for b in resumed] == [_pairs(b) for b in full[offset:]]
    # without the stored failed-decode counts the continuation would drift (the state is needed)
    drift = stream()
    drift.set_position(epoch, start)
    assert [_pairs(b) for b in drift] != [_pairs(b) for b in full[offset:]]


def test_progress_state_moves_to_next_epoch_at_epoch_end(uneven_root):
    sched = BalancedSchedule(MODS, resolve_weights(MODS), 4, 0)
    p = StreamProgress(sched, 5, 2)
    for local in range(5):
        p.observe({"epoch": 3, "local": local, "lane": local % 2, "composition": {"image": 4},
                   "extra": {"image": 1}, "skipped": 0})
    state = p.state_dict()
    assert (state["epoch"], state["next"], state["extras"]) == (4, 0, [{}])
    assert p.state_dict(limit=3)["epoch"] == 4  # limit_train_batches ends the epoch earlier
    q = StreamProgress(sched, 5, 2)
    q.load_state_dict(state)
    assert q.begin_epoch(trainer_epoch=3, rank=0, world_size=1) == (4, 0, {})
    assert q.mix_fractions()["image"] == 1.0
    r = StreamProgress(sched, 5, 3)  # a different num_workers: continues, but warns it is not exact
    r.load_state_dict(p.state_dict(limit=None) | {"next": 2, "epoch": 3, "extras": [{"0/image": 1}]})
    with pytest.warns(UserWarning, match="same data.init_args.num_workers"):
        assert r.begin_epoch(3, 0, 1) == (3, 2, {})


# ------------------------------------------------------------------------------------------------ errors


def test_configuration_errors_name_the_modality(uneven_root, tmp_path, tiny_model_dir):
    kw = dict(model="unused", batch_size=4, steps_per_epoch=2)
    with pytest.raises(ValueError, match=r"weight of modality 'audio' is 0.*drop it from data.init_args.modalities"):
        OmniDataModule(str(uneven_root), MODS, weights={"image": 1, "video": 1, "document": 1, "audio": 0}, **kw)
    with pytest.raises(ValueError, match=r"weight of modality 'video' is -1"):
        OmniDataModule(str(uneven_root), MODS, weights={"image": 1, "video": -1, "document": 1, "audio": 1}, **kw)
    with pytest.raises(ValueError, match=r"missing \['audio'\]"):
        OmniDataModule(str(uneven_root), MODS, weights={"image": 1, "video": 1, "document": 1}, **kw)
    with pytest.raises(ValueError, match="not both"):
        OmniDataModule(str(uneven_root), MODS, weights={m: 1 for m in MODS}, size_temperature=2.0, **kw)
    with pytest.raises(ValueError, match="size_temperature must be > 0"):
        OmniDataModule(str(uneven_root), MODS, size_temperature=0.0, **kw)
    # a modality without shards: the error names it and the missing folder
    with pytest.raises(FileNotFoundError, match=r"modality 'audio' \(train\).*drop it from data.init_args.modalities"):
        OmniDataModule(str(tmp_path), ["audio"], **kw).setup("fit")
    # an empty modality (its index lists 0 samples)
    empty = tmp_path / "empty" / "audio" / "train"
    empty.mkdir(parents=True)
    with tarfile.open(empty / "shard-000000.tar", "w"):
        pass
    (empty / "index.json").write_text(json.dumps({"modality": "audio", "split": "train", "num_samples": 0,
                                                  "schema_version": 1,
                                                  "shards": [{"file": "shard-000000.tar", "num_samples": 0}]}))
    with pytest.raises(ValueError, match=r"modality 'audio' is empty: .*holds 0 samples"):
        OmniDataModule(str(tmp_path / "empty"), ["audio"], **kw).setup("fit")
    # fewer shards than workers x ranks: a warning naming the modality and what to do
    dm = OmniDataModule(str(uneven_root), ["video", "image"], num_workers=2, **dict(kw, model=str(tiny_model_dir)))
    pattern = r"modality 'video' has 1 shard\(s\).*2 worker\(s\) x 1 rank\(s\).*more, smaller shards"
    with pytest.warns(UserWarning, match=pattern) as rec:
        dm.setup("fit")
    assert not any("'image'" in str(w.message) for w in rec)  # 3 shards >= 2 readers


# ------------------------------------------------------------------------------------------------ DDP


def _rank_main(root: str, model: str, out: str, rank: int, port: int) -> None:
    """One rank of a 2-process gloo group (forked from the test process: no second interpreter start-up)."""
    import torch.distributed as dist

    from omni_lightning.data import datamodule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # the processor is not under test here: collate to keys only (the DataLoader's forked workers inherit it)
    datamodule.Collator.__call__ = lambda self, samples, m: {"modality": m, "size": len(samples),
                                                             "keys": [s["key"] for s in samples]}
    dm = datamodule.OmniDataModule(root, MODS, model=model, batch_size=4, steps_per_epoch=7, num_workers=2,
                                   shuffle_buffer=8, val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)  # what Lightning calls before each training step
        seen.append([batch["modality"], batch["keys"], batch["size"]])
    state = dm.state_dict()  # a collective: every rank's stream state lands in rank 0's checkpoint
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "state": state, "mix": dm.mix, "warnings": [str(w.message) for w in caught]}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_share_the_schedule_with_equal_batch_counts(uneven_root, tmp_path, tiny_model_dir):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = 29500 + os.getpid() % 2000
    procs = [ctx.Process(target=_rank_main, args=(str(uneven_root), str(tiny_model_dir), str(tmp_path), r, port))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["seen"]) == len(r1["seen"]) == 7  # exact and equal, although shard counts are 3/1/3/2
    assert [s[0] for s in r0["seen"]] == [s[0] for s in r1["seen"]]  # the same modality at every step
    assert [s[0] for s in r0["seen"]] == [modality_for_step(0, s, MODS, [0.25] * 4) for s in range(7)]
    assert all(s[2] == 4 for s in r0["seen"] + r1["seen"])
    assert [s[1] for s in r0["seen"]] != [s[1] for s in r1["seen"]]  # ... from each rank's own streams
    assert r0["mix"] == r1["mix"] and sum(r0["mix"].values()) == pytest.approx(1.0)
    assert len(r0["state"]["train_stream"]["extras"]) == 2  # gathered from both ranks
    assert any("modality 'video' has 1 shard(s)" in w and "4 streams" in w for w in r0["warnings"])


def test_shuffle_buffer_is_per_worker_split_by_weight(uneven_root):
    probs = resolve_weights(MODS, {"image": 1, "video": 1, "document": 2, "audio": 4})
    ds = _stream(uneven_root, probs, shuffle=256)
    assert [ds.stream_buffer(m) for m in MODS] == [32, 32, 64, 128]  # 256 in all, as one plain pipeline holds
    assert _stream(uneven_root, {"image": 1.0}, shuffle=256, mods=["image"]).stream_buffer("image") == 256
    assert _stream(uneven_root, probs, shuffle=4).stream_buffer("image") == 2  # every stream still shuffles
    assert _stream(uneven_root, probs, shuffle=1).stream_buffer("audio") == 0  # off
