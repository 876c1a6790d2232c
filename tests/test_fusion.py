"""Decoupled Specialist Fusion (omni_lightning/fusion/, `omni-lightning fuse`, slurm/fuse.sh).

Every merge method is checked against a brute-force reference written independently here (float64 numpy,
Python sorts for TIES, a re-implementation of the documented DARE seeding), on small random checkpoints that
are sharded and mixed-dtype. Then ownership, every bad input, interruption, the tiny omni model end to end
(load + encode every modality), the CLI with the shipped config, and the SLURM script under a stand-in srun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omni_lightning import fusion
from omni_lightning.fusion import (
    FuseConfig,
    FusionError,
    dare_keep_mask,
    fuse,
    load_config,
)
from omni_lightning.fusion.writer import ShardedWriter

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fuse.yaml"
ALPHA = [0.3, 0.3, 0.5]
NAMES = ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------- helpers
def write_ckpt(d: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(d / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(12, 8, generator=g),
        "model.layers.0.mlp.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.weight": torch.randn(16, 8, generator=g),
        "model.layers.1.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "model.layers.0.mlp.bias": torch.randn(16, generator=g).to(torch.float16),
    }


def make_set(root: Path, scale: float = 0.5, config: dict | None = None) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base (2 shards) and three specialists (base + noise; one sharded) of plain HF checkpoints."""
    base = base_tensors()
    g = torch.Generator().manual_seed(1)
    specs = []
    for i in range(3):
        specs.append({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()})
    cfg = config or {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}
    b = write_ckpt(root / "base", base, shards=2, config=cfg)
    dirs = [write_ckpt(root / n, s, shards=2 if i == 1 else 1, config=cfg) for i, (n, s) in enumerate(zip(NAMES, specs))]
    return b, dirs, base, specs


def run(b: Path, dirs: list[Path], out: Path, **kw) -> fusion.FuseResult:
    kw.setdefault("alpha", list(ALPHA))
    kw.setdefault("progress", False)
    kw.setdefault("fsync", False)
    return fuse(FuseConfig(base=str(b), specialists=[str(d) for d in dirs], out=str(out), **kw))


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from omni_lightning.model.omni import load_safetensors_dir

    return load_safetensors_dir(d)


def f32_delta(spec: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """Δ exactly as specified: one float32 subtraction, then float64 for the reference arithmetic."""
    return (spec.float() - base.float()).double().numpy().reshape(-1)


def assert_matches(out: torch.Tensor, ref64: np.ndarray, tol: float = 2e-6) -> None:
    """``out`` (stored dtype) equals the float64 reference rounded to that dtype, up to float32 rounding."""
    ref = torch.from_numpy(ref64).to(torch.float32).to(out.dtype).reshape(out.shape)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    else:  # at most one unit in the last place of the stored dtype, on a rare rounding boundary
        a, r = out.float().reshape(-1), ref.float().reshape(-1)
        ulp = torch.finfo(out.dtype).eps * torch.maximum(a.abs(), r.abs()).clamp_min(torch.finfo(out.dtype).tiny)
        assert bool(((a - r).abs() <= ulp * 1.01).all()), f"max diff {(a - r).abs().max()}"
        assert float((a != r).float().mean()) < 0.05


def ties_reference(base: torch.Tensor, specs: list[torch.Tensor], alphas: list[float], density: float,
                   scale: float = 1.0, deltas: list[np.ndarray] | None = None) -> np.ndarray:
    """TIES by brute force: full Python sort for the trim, explicit loops for election and disjoint mean."""
    b = base.double().numpy().reshape(-1)
    n = b.size
    ds = deltas if deltas is not None else [f32_delta(s, base) for s in specs]
    k = max(1, math.ceil(density * n))
    trimmed = []
    for d in ds:
        order = sorted(range(n), key=lambda i: (-abs(d[i]), i))  # deterministic: larger first, then lower index
        t = np.zeros(n)
        for i in order[:k]:
            t[i] = d[i]
        trimmed.append(t)
    out = np.empty(n)
    for i in range(n):
        s = float(sum(a * t[i] for a, t in zip(alphas, trimmed) if a != 0))
        sign = (s > 0) - (s < 0)
        num = sum(a * t[i] for a, t in zip(alphas, trimmed) if a != 0 and sign != 0 and np.sign(t[i]) == sign)
        den = sum(a for a, t in zip(alphas, trimmed) if a != 0 and sign != 0 and np.sign(t[i]) == sign)
        out[i] = b[i] + scale * (num / den if den > 0 else 0.0)
    return out


def reference_dare_keep(seed: int, spec: str, tensor: str, n: int, p: float) -> np.ndarray:
    """The documented DARE seeding, re-implemented: blocks of 2**20 elements, blake2b(seed, spec, tensor, block)."""
    keep = np.empty(n, dtype=bool)
    for blk in range(0, (n + (1 << 20) - 1) >> 20):
        key = "\x1f".join(map(str, (seed, spec, tensor, blk))).encode()
        s = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        u = torch.rand(1 << 20, generator=torch.Generator().manual_seed(s)).numpy()
        lo = blk << 20
        keep[lo : min(n, lo + (1 << 20))] = u[: min(n, lo + (1 << 20)) - lo] >= p
    return keep


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------------------------- methods
@pytest.fixture()
def ckpts(tmp_path):
    return make_set(tmp_path)


def test_task_arithmetic_matches_reference_and_chunking_does_not_matter(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    run(b, dirs, tmp_path / "out")
    run(b, dirs, tmp_path / "out-rows", chunk_mb=2e-5, read_mb=1e-4)  # one row merged at a time, a few per read
    out, out_rows = load_dir(tmp_path / "out"), load_dir(tmp_path / "out-rows")
    assert set(out) == set(base)
    for name, b0 in base.items():
        ref = b0.double().numpy().reshape(-1) + sum(a * f32_delta(s[name], b0) for a, s in zip(ALPHA, specs))
        assert out[name].dtype == b0.dtype and out[name].shape == b0.shape
        assert_matches(out[name], ref)
        assert torch.equal(out[name], out_rows[name])


def test_arithmetic_is_float32_even_for_bf16_weights(tmp_path):
    """0.5·2⁻⁷ + 0.5·2⁻⁷ added in bf16 rounds away at 1.0 (ties to even); in float32 it survives."""
    base = {"w": torch.ones(4, 4, dtype=torch.bfloat16)}
    spec = {"w": torch.full((4, 4), 1 + 2**-7, dtype=torch.bfloat16)}
    b = write_ckpt(tmp_path / "base", base)
    dirs = [write_ckpt(tmp_path / n, spec) for n in ("s1", "s2")]
    run(b, dirs, tmp_path / "out", alpha=[0.5, 0.5])
    out = load_dir(tmp_path / "out")["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, spec["w"])


def test_ties_matches_brute_force_with_many_ties_at_the_threshold(tmp_path):
    # exact dyadic values: Δ in {±1/4, ±1/2, ±1} so a large share of every task vector ties at the threshold
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.t": (torch.randint(-8, 8, (20, 9), generator=g) / 8.0).float(),
            "model.layers.1.u": (torch.randint(-8, 8, (7, 5), generator=g) / 8.0).to(torch.bfloat16),
            "model.norm.weight": torch.randn(6, generator=g)}
    levels = torch.tensor([-1.0, -0.5, -0.25, 0.25, 0.5, 1.0])
    specs = []
    for _ in range(3):
        s = {}
        for k, v in base.items():
            if k == "model.norm.weight":
                s[k] = v + torch.randn(v.shape, generator=g)
            else:
                pick = levels[torch.randint(0, 6, v.shape, generator=g)]
                pick[torch.rand(v.shape, generator=g) < 0.3] = 0.0
                s[k] = (v.float() + pick).to(v.dtype)
        specs.append(s)
    b = write_ckpt(tmp_path / "base", base)
    dirs = [write_ckpt(tmp_path / n, s) for n, s in zip(NAMES, specs)]
    d0 = f32_delta(specs[0]["model.layers.0.t"], base["model.layers.0.t"])
    k = math.ceil(0.3 * d0.size)
    thr = np.sort(np.abs(d0))[::-1][k - 1]
    assert (np.abs(d0) > thr).sum() < k < (np.abs(d0) >= thr).sum()  # the threshold really is tied
    for chunk, read in ((32.0, 16.0), (2e-5, 2e-5), (2e-5, 1e-4)):  # whole tensors; row by row; blocks of rows
        out_dir = tmp_path / f"out-{chunk}-{read}"
        run(b, dirs, out_dir, method="ties", ties={"density": 0.3, "scale": 0.8}, chunk_mb=chunk, read_mb=read)
        out = load_dir(out_dir)
        for name, b0 in base.items():
            ref = ties_reference(b0, [s[name] for s in specs], ALPHA, 0.3, scale=0.8)
            assert_matches(out[name], ref)


def test_ties_density_one_weights_and_zero_alpha(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    alphas = [0.0, 1.0, 0.5]
    run(b, dirs, tmp_path / "out", method="ties", alpha=alphas, ties={"density": 1.0})
    out = load_dir(tmp_path / "out")
    for name, b0 in base.items():
        assert_matches(out[name], ties_reference(b0, [s[name] for s in specs], alphas, 1.0))


# ------------------------------------------------------------------ TIES thresholds: streaming select, exact
def sort_threshold(a: np.ndarray, k: int) -> tuple[float, int, int]:
    """(k-th largest, how many entries equal to it TIES keeps, how many there are) by a full sort."""
    thr = float(np.sort(a)[::-1][k - 1])
    return thr, k - int((a > thr).sum()), int((a == thr).sum())


def magnitude_cases(g: torch.Generator) -> list[torch.Tensor]:
    n = 5000
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    return [
        torch.randn(n, generator=g).abs(),  # continuous
        levels[torch.randint(0, 5, (n,), generator=g)],  # a few values: ties at every threshold
        torch.zeros(n),  # an all-zero task vector
        torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.randn(n, generator=g).abs()),  # mostly zeros
        (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16).float().abs(),  # bf16 values: many repeats
        torch.full((n,), 2.0 ** -140),  # one denormal value everywhere
    ]


@pytest.mark.parametrize("mode", ["held", "bracket", "radix"])
def test_magnitude_select_matches_a_sort(monkeypatch, mode):
    """MagnitudeSelect (every density at once, chunks in any order) and radix_select = a full sort, ties included."""
    from omni_lightning.fusion import methods

    if mode != "held":
        monkeypatch.setattr(methods, "HOLD_ELEMS", 100)
    if mode == "radix":  # a one-value sample and zero-width brackets: they miss, the radix select answers
        monkeypatch.setattr(methods, "BRACKET_Z", 0.0)
        monkeypatch.setattr(methods, "BRACKET_SLACK", 0.0)
    g = torch.Generator().manual_seed(5)
    densities = [1e-4, 0.05, 0.2, 0.3, 0.5, 0.9, 1.0]
    misses = 0
    for a in magnitude_cases(g):
        n = a.numel()
        ks = [methods.ties_k(d, n) for d in densities]
        sel = methods.MagnitudeSelect(n, ks)
        perm = torch.randperm(n, generator=g)  # any order of rows: only values and counts matter
        cuts = [0, 7, 300, 301, 2222, 4000, n]
        probe = perm[: (1 if mode == "radix" else 600)]
        sel.add(a[probe].clone(), probe=True)
        sel.end_probe()
        rest = perm[probe.numel():]
        for lo, hi in zip(cuts, cuts[1:]):
            sel.add(a[rest[lo:hi]].clone())
        got = sel.result()
        for k, r in zip(ks, got):
            if r is None:
                misses += 1
                r = methods.radix_select(lambda: iter(torch.split(a, 777)), k)
            assert (r.value, r.quota, r.ties) == sort_threshold(a.numpy(), k), (k, r)
            assert r == methods.radix_select(lambda: iter(torch.split(a, 1000)), k)
    if mode == "radix":
        assert misses > 0
    if mode == "held":
        assert misses == 0


def ties_f32_reference(base: torch.Tensor, specs: list[torch.Tensor], alphas: list[float], density: float,
                       scale: float, dare: tuple[int, float, str] | None = None) -> torch.Tensor:
    """The textbook TIES in float32, its trim by a full sort (magnitude descending, then lowest flat index):
    what the streaming implementation must equal bit for bit."""
    b = base.float().reshape(-1)
    n = b.numel()
    k = max(1, math.ceil(density * n))
    ds = []
    for i, s in enumerate(specs):
        d = s.float().reshape(-1) - b
        if dare is not None:
            seed, p, tensor = dare
            d = d * dare_keep_mask(seed, NAMES[i], tensor, 0, n, p) * (1.0 / (1.0 - p))
        order = np.lexsort((np.arange(n), -np.abs(d.numpy())))  # by -|Δ|, then by index
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.from_numpy(order[:k])] = True
        ds.append(d * keep if density < 1 else d)
    total = torch.zeros(n)
    for a, d in zip(alphas, ds):
        if a:
            total.add_(d, alpha=a)
    sign = torch.sign(total)
    num, den = torch.zeros(n), torch.zeros(n)
    for a, d in zip(alphas, ds):
        if a:
            agree = (torch.sign(d) == sign) & (sign != 0)
            num.add_(d * agree, alpha=a)
            den.add_(agree.float(), alpha=a)
    merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return torch.add(b, merged, alpha=scale).to(base.dtype).reshape(base.shape)


@pytest.mark.parametrize("dare_p", [0.0, 0.3])
def test_streamed_ties_is_bit_identical_to_a_sort_reference(tmp_path, monkeypatch, dare_p):
    """TIES and DARE+TIES through fuse, with brackets from sampled rows (and a forced radix fallback), equal the
    sort-based float32 reference bit for bit: ties at the threshold, all-zero task vectors, bf16 and float32."""
    from omni_lightning.fusion import methods

    monkeypatch.setattr(methods, "HOLD_ELEMS", 64)
    monkeypatch.setattr(methods, "PROBE_ELEMS", 256)
    g = torch.Generator().manual_seed(11)
    base = {"model.layers.0.t": (torch.randint(-8, 8, (60, 37), generator=g) / 8.0).to(torch.bfloat16),
            "model.layers.1.c": torch.randn(50, 41, generator=g),
            "model.layers.2.z": torch.randn(30, 20, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(40, generator=g)}
    levels = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    specs = []
    for i in range(3):
        s = {}
        for name, v in base.items():
            if name == "model.layers.0.t":  # dyadic steps: many entries tie at the threshold
                pick = levels[torch.randint(0, 4, v.shape, generator=g)]
                pick[torch.rand(v.shape, generator=g) < 0.4] = 0.0
                s[name] = (v.float() + pick).to(v.dtype)
            elif name == "model.layers.2.z" and i == 1:  # an all-zero task vector
                s[name] = v.clone()
            else:
                s[name] = (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
        specs.append(s)
    b = write_ckpt(tmp_path / "base", base)
    dirs = [write_ckpt(tmp_path / n, s) for n, s in zip(NAMES, specs)]
    calls = []
    real = methods.radix_select
    monkeypatch.setattr(methods, "radix_select", lambda chunks, k: calls.append(k) or real(chunks, k))
    extra = {"method": "dare", "dare": {"p": dare_p, "seed": 4, "combine": "ties"}} if dare_p else {"method": "ties"}
    for density, z in ((0.3, 8.0), (0.1, 0.0)):  # z = 0: zero-width brackets, most miss -> radix select
        monkeypatch.setattr(methods, "BRACKET_Z", z)
        monkeypatch.setattr(methods, "BRACKET_SLACK", 2e-3 if z else 0.0)
        out_dir = tmp_path / f"out-{density}"
        run(b, dirs, out_dir, ties={"density": density, "scale": 0.8}, chunk_mb=2e-3, read_mb=4e-3, **extra)
        out = load_dir(out_dir)
        for name, b0 in base.items():
            ref = ties_f32_reference(b0, [s[name] for s in specs], ALPHA, density, 0.8,
                                     (4, dare_p, name) if dare_p else None)
            assert torch.equal(out[name].view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), name
    assert calls  # the fallback really ran


def test_density_sweep_reads_once_for_every_density_and_equals_separate_fuses(ckpts, tmp_path, monkeypatch):
    """fuse_densities: one threshold pass for the whole sweep (later densities skip it), and every output equals
    the fuse of that density alone, bit for bit; TIES and DARE + TIES."""
    from omni_lightning.fusion import engine, methods
    from omni_lightning.fusion.engine import fuse_densities

    monkeypatch.setattr(methods, "HOLD_ELEMS", 64)
    monkeypatch.setattr(methods, "PROBE_ELEMS", 128)
    b, dirs, base, specs = ckpts
    passes = []
    real = engine._Engine.run_thr
    monkeypatch.setattr(engine._Engine, "run_thr", lambda self, task, raws: passes.append(task.tensor.name) or
                        real(self, task, raws))
    densities = [0.1, 0.3, 0.5]
    for extra in ({"method": "ties"}, {"method": "dare", "dare": {"p": 0.2, "seed": 1, "combine": "ties"}}):
        cfg = FuseConfig(base=str(b), specialists=[str(d) for d in dirs], alpha=list(ALPHA), progress=False,
                         fsync=False, chunk_mb=1e-3, read_mb=2e-3, **extra)
        outs = [tmp_path / f"sweep-{extra['method']}-{d}" for d in densities]
        passes.clear()
        fuse_densities(cfg, densities, outs)
        first = list(passes)
        assert first  # the first density's fuse ran the threshold pass ...
        passes.clear()
        for d, o in zip(densities, outs):
            alone = tmp_path / f"alone-{extra['method']}-{d}"
            run(b, dirs, alone, ties={"density": d}, chunk_mb=1e-3, read_mb=2e-3, **extra)
            got, ref = load_dir(o), load_dir(alone)
            assert got.keys() == ref.keys()
            for name in ref:
                assert torch.equal(got[name].view(-1).view(torch.uint8), ref[name].view(-1).view(torch.uint8)), name
        assert len(passes) == len(first) * len(densities)  # ... which each density alone runs again
    with pytest.raises(FusionError, match="needs TIES"):
        fuse_densities(FuseConfig(base=str(b), specialists=[str(d) for d in dirs], alpha=list(ALPHA)), [0.2], ["x"])
    cache = methods.ThresholdCache([0.2])
    cfg = FuseConfig(base=str(b), specialists=[str(d) for d in dirs], alpha=list(ALPHA), method="ties",
                     progress=False, fsync=False)
    fuse(dataclasses.replace(cfg, out=str(tmp_path / "c1")), cache)
    with pytest.raises(FusionError, match="same base, specialists and DARE"):
        fuse(dataclasses.replace(cfg, specialists=[str(d) for d in dirs[:2]], alpha=ALPHA[:2],
                                 out=str(tmp_path / "c2")), cache)


def test_dare_factors_equal_the_documented_mask():
    """The cached DARE factors (each random block drawn once, kept as bits between TIES' passes) multiply a delta
    exactly as mask-then-rescale with dare_keep_mask, whatever the chunking and order."""
    from omni_lightning.fusion.methods import DARE_BLOCK, DareFactors

    g = torch.Generator().manual_seed(2)
    for p in (0.1, 0.5, 0.77):
        f = DareFactors(3, p, slots=2, retain=True)
        spans = [(0, 100), (50, 300_000), (DARE_BLOCK - 10, 20), (300_050, 2_000_000), (5, 10),
                 (3 * DARE_BLOCK, 10), (2_500_000, 700_000)]
        for _ in range(2):  # the second time from the kept bits
            for spec in ("a", "b", "c"):
                for start, n in spans:
                    d = torch.randn(n, generator=g)
                    ref = d * dare_keep_mask(3, spec, "t", start, n, p) * (1.0 / (1.0 - p))
                    got = d * f.factors(spec, "t", start, n)
                    assert torch.equal(ref.view(torch.int32), got.view(torch.int32)), (p, spec, start, n)
        assert f.packed


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_matches_reference(ckpts, tmp_path, combine):
    b, dirs, base, specs = ckpts
    p, seed = 0.4, 7
    run(b, dirs, tmp_path / "out", method="dare", dare={"p": p, "seed": seed, "combine": combine},
        ties={"density": 0.5}, names=NAMES, chunk_mb=1e-4)
    out = load_dir(tmp_path / "out")
    for name, b0 in base.items():
        n = b0.numel()
        ds = [f32_delta(s[name], b0) * reference_dare_keep(seed, nm, name, n, p) / (1 - p)
              for nm, s in zip(NAMES, specs)]
        if combine == "task_arithmetic":
            ref = b0.double().numpy().reshape(-1) + sum(a * d for a, d in zip(ALPHA, ds))
        else:
            ref = ties_reference(b0, [], ALPHA, 0.5, deltas=ds)
        assert_matches(out[name], ref, tol=1e-5)


def test_dare_same_seed_same_output_any_order(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    dare = {"p": 0.5, "seed": 11}
    run(b, dirs, tmp_path / "o1", method="dare", dare=dare)
    run(b, dirs, tmp_path / "o2", method="dare", dare=dare, chunk_mb=2e-5, read_mb=1e-4)
    run(b, dirs[::-1], tmp_path / "o3", method="dare", dare=dare, alpha=ALPHA[::-1])
    run(b, dirs, tmp_path / "o4", method="dare", dare={"p": 0.5, "seed": 12})
    o1, o2, o3, o4 = (load_dir(tmp_path / f"o{i}") for i in range(1, 5))
    for name in base:
        assert torch.equal(o1[name], o2[name])  # same seed, other chunking: identical bytes
        # other order: same masks; only the float32 summation order differs
        torch.testing.assert_close(o1[name].float(), o3[name].float(), rtol=1e-6, atol=1e-6) if o1[name].dtype == torch.float32 \
            else assert_matches(o3[name], o1[name].double().numpy().reshape(-1))
    assert any(not torch.equal(o1[n], o4[n]) for n in base)  # another seed: another result


def test_dare_mean_over_seeds_approaches_the_undropped_delta():
    torch.manual_seed(0)
    delta = torch.randn(3000)
    p, n_seeds = 0.3, 200
    acc = torch.zeros_like(delta)
    kept = 0.0
    for seed in range(n_seeds):
        keep = dare_keep_mask(seed, "audio", "model.layers.3.w", 0, delta.numel(), p)
        kept += float(keep.float().mean())
        acc += delta * keep / (1 - p)
    mean = acc / n_seeds
    assert abs(kept / n_seeds - (1 - p)) < 0.01
    sigma = delta.abs() * math.sqrt(p / (1 - p) / n_seeds)  # per-element standard error
    assert float(((mean - delta).abs() / sigma).max()) < 5.5
    assert float((mean - delta).norm() / delta.norm()) < 0.06
    # chunk-independence of the mask itself: any window equals the slice of the whole
    whole = dare_keep_mask(5, "x", "t", 0, 3 * (1 << 20) // 2, p)
    assert torch.equal(dare_keep_mask(5, "x", "t", (1 << 20) - 7, 20, p), whole[(1 << 20) - 7 : (1 << 20) + 13])


def test_linear_matches_reference(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    run(b, dirs, tmp_path / "out", method="linear", alpha=[1.0, 2.0, 1.0], linear={"base_weight": 0.5})
    out = load_dir(tmp_path / "out")
    for name, b0 in base.items():
        ref = (0.5 * b0.double() + sum(a * s[name].double() for a, s in zip([1.0, 2.0, 1.0], specs))) / 4.5
        assert_matches(out[name], ref.numpy().reshape(-1))


def test_part_overrides_keep_base_and_alpha(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    parts = {"model.layers.0.": {"mode": "keep_base"}, "model.layers.1.": {"alpha": {"c": 0.9}}}
    run(b, dirs, tmp_path / "out", parts=parts, names=NAMES)
    out = load_dir(tmp_path / "out")
    for name, b0 in base.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(out[name], b0)
        else:
            al = [0.3, 0.3, 0.9] if name.startswith("model.layers.1.") else ALPHA
            assert_matches(out[name], b0.double().numpy().reshape(-1) + sum(a * f32_delta(s[name], b0) for a, s in zip(al, specs)))


# ----------------------------------------------------------------------------------------------- ownership
def test_new_tensors_and_new_rows_are_copied_bit_exactly(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    g = torch.Generator().manual_seed(9)
    added = torch.randint(-32768, 32767, (5, 3), dtype=torch.int16, generator=g).view(torch.bfloat16)  # any bits
    added = torch.where(torch.isfinite(added), added, torch.zeros_like(added))
    s2 = dict(specs[2])
    s2["audio.new"] = added
    s2["model.embed_tokens.weight"] = torch.cat([specs[2]["model.embed_tokens.weight"], torch.randn(3, 8, generator=g)])
    write_ckpt(dirs[2], s2)
    s0 = dict(specs[0])
    s0["vision.extra"] = torch.randn(4, generator=g).double()
    write_ckpt(dirs[0], s0)
    res = run(b, dirs, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert out["audio.new"].dtype == torch.bfloat16 and torch.equal(out["audio.new"].view(torch.int16), added.view(torch.int16))
    assert out["vision.extra"].dtype == torch.float64 and torch.equal(out["vision.extra"], s0["vision.extra"])
    emb = out["model.embed_tokens.weight"]
    assert emb.shape == (15, 8)
    assert torch.equal(emb[12:], s2["model.embed_tokens.weight"][12:])
    b0 = base["model.embed_tokens.weight"]
    ref = b0.double().numpy().reshape(-1) + sum(a * f32_delta(s["model.embed_tokens.weight"][:12], b0) for a, s in zip(ALPHA, specs))
    assert_matches(emb[:12], ref)
    assert res.diagnostics["files_from"] == "c"  # tokenizer/config from the specialist that added tokens
    assert res.diagnostics["tensors"]["added"] == 2


def test_tensors_pair_by_normalized_names(ckpts, tmp_path):
    """A specialist saved by transformers 5 (``model.language_model.layers.*``) fuses with a hub-named base."""
    b, dirs, base, specs = ckpts
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in specs[1].items()}
    write_ckpt(dirs[1], renamed, config={"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2})
    (dirs[1] / "model.safetensors.index.json").unlink()
    for f in dirs[1].glob("model-*.safetensors"):
        f.unlink()
    res = run(b, dirs, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert set(out) == set(base)  # the base's names
    for name, b0 in base.items():
        assert_matches(out[name], b0.double().numpy().reshape(-1) + sum(a * f32_delta(s[name], b0) for a, s in zip(ALPHA, specs)))
    assert any("paired with the base by normalized name" in w for w in res.diagnostics["warnings"])


def test_output_sharding_index_and_provenance(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    res = run(b, dirs, tmp_path / "out", shard_size=600)
    out_dir = tmp_path / "out"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and set(index["weight_map"]) == set(base)
    for f in files:  # every shard is a valid safetensors file the reference library reads
        with safe_open(str(out_dir / f), "pt") as h:
            assert set(h.keys()) == {k for k, v in index["weight_map"].items() if v == f}
    cfg = json.loads((out_dir / "config.json").read_text())
    rec = cfg["omni_lightning_fusion"]
    assert rec["method"] == "task_arithmetic" and rec["coefficients"] == dict(zip(NAMES, ALPHA))

    def content_hash(tensors: dict[str, torch.Tensor], kind: str) -> str:  # independent of how files are sharded
        h = hashlib.sha256()
        dt = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
        for name in sorted(tensors):
            raw = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
            digest = hashlib.sha256(raw).hexdigest() if kind == "sha256" else f"{zlib.crc32(raw):08x}"
            h.update(f"{name}\0{dt[tensors[name].dtype]}\0{list(tensors[name].shape)}\0{digest}\n".encode())
        return h.hexdigest()

    assert rec["hash"]["per_tensor"] == "crc32"
    assert rec["base"]["hash"] == content_hash(base, "crc32")
    assert [s["hash"] for s in rec["specialists"]] == [content_hash(s, "crc32") for s in specs]
    # one output shard: tensors are streamed widest dtype first, not by name; sha256 digests this time
    run(b, dirs, tmp_path / "out1", hash="sha256")
    rec1 = json.loads((tmp_path / "out1" / "config.json").read_text())["omni_lightning_fusion"]
    assert rec1["base"]["hash"] == content_hash(base, "sha256")
    assert [s["hash"] for s in rec1["specialists"]] == [content_hash(s, "sha256") for s in specs]
    diag = json.loads((out_dir / "diagnostics.json").read_text())
    assert (out_dir / "diagnostics.png").stat().st_size > 1000
    # diagnostics against a direct computation over the fused tensors
    flat = [torch.cat([torch.from_numpy(f32_delta(s[n], base[n])) for n in sorted(base)]) for s in specs]
    for nm, v in zip(NAMES, flat):
        assert diag["task_vectors"]["norm"][nm] == pytest.approx(float(v.norm()), rel=1e-4)
    cos_ab = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert diag["task_vectors"]["cosine"]["a"]["b"] == pytest.approx(cos_ab, abs=1e-4)
    l1 = torch.cat([torch.from_numpy(f32_delta(specs[2][n], base[n])) for n in sorted(base) if ".layers.1." in n])
    assert diag["task_vectors"]["layer_norm"]["c"]["model"][1] == pytest.approx(float(l1.norm()), rel=1e-4)
    assert res.out == out_dir


# ----------------------------------------------------------------------------------------------- bad input
def _fails(tmp_path: Path, exc, match: list[str], **kw):
    before = listing(tmp_path)
    b = kw.pop("b")
    dirs = kw.pop("dirs")
    with pytest.raises(exc) as info:
        run(b, dirs, tmp_path / "out", **kw)
    msg = str(info.value)
    for m in match:
        assert m in msg, f"{m!r} not in {msg!r}"
    assert listing(tmp_path) == before, "a failed fuse left something behind"
    return msg


def test_bad_inputs_are_refused_before_writing(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    root = tmp_path
    # missing directory; hub-looking id
    _fails(root, FileNotFoundError, [str(root / "nope")], b=b, dirs=[dirs[0], root / "nope", dirs[2]])
    _fails(root, FileNotFoundError, ["Qwen/Qwen3-VL-8B", "hub id"], b="Qwen/Qwen3-VL-8B", dirs=dirs)
    # coefficient list; parameters out of range; unknown method
    _fails(root, FusionError, ["alpha has 2 coefficient", "3 specialist"], b=b, dirs=dirs, alpha=[0.3, 0.5])
    for ties in ({"density": 0.0}, {"density": 1.5}):
        _fails(root, FusionError, ["ties.density", "(0, 1]"], b=b, dirs=dirs, method="ties", ties=ties)
    for p in (1.0, -0.1):
        _fails(root, FusionError, ["dare.p", "[0, 1)"], b=b, dirs=dirs, method="dare", dare={"p": p})
    _fails(root, FusionError, ["method 'slerp'"], b=b, dirs=dirs, method="slerp")
    _fails(root, FusionError, ["non-negative"], b=b, dirs=dirs, method="ties", alpha=[0.3, -0.3, 0.5])
    _fails(root, FusionError, ["unique"], b=b, dirs=[dirs[0], dirs[0], dirs[1]])


def _variant(root: Path, name: str, tensors: dict, **kw) -> Path:
    return write_ckpt(root / name, tensors, config={"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}, **kw)


def test_bad_tensors_name_the_file_and_tensor(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    root = tmp_path / "bad"
    root.mkdir()
    t = "model.layers.1.mlp.weight"
    # shape
    s = dict(specs[1]); s[t] = torch.randn(16, 9)
    d = _variant(root, "shape", s)
    _fails(tmp_path, FusionError, [str(d / "model.safetensors"), t, "[16, 9]"], b=b, dirs=[dirs[0], d, dirs[2]])
    # more rows are allowed only for embedding matrices (new tokens), not for any other tensor
    s = dict(specs[1]); s[t] = torch.randn(17, 8)
    d = _variant(root, "rows", s)
    _fails(tmp_path, FusionError, [str(d / "model.safetensors"), t, "[17, 8]"], b=b, dirs=[dirs[0], d, dirs[2]])
    # dtype family
    s = dict(specs[1]); s[t] = torch.zeros(16, 8, dtype=torch.int32)
    d = _variant(root, "dtype", s)
    _fails(tmp_path, FusionError, [str(d / "model.safetensors"), t, "I32", "dtype family"], b=b, dirs=[dirs[0], d, dirs[2]])
    # a specialist lacks a base tensor
    s = {k: v for k, v in specs[1].items() if k != t}
    d = _variant(root, "missing", s)
    _fails(tmp_path, FusionError, [str(d), t, "lacks"], b=b, dirs=[dirs[0], d, dirs[2]])
    # two specialists add the same new tensor
    d1 = _variant(root, "add1", {**specs[0], "extra.w": torch.ones(2)})
    d2 = _variant(root, "add2", {**specs[1], "extra.w": torch.ones(2)})
    _fails(tmp_path, FusionError, [str(d1 / "model.safetensors"), str(d2 / "model.safetensors"), "extra.w"],
           b=b, dirs=[d1, d2, dirs[2]])
    # two specialists add rows to the same embedding
    e = "model.embed_tokens.weight"
    d1 = _variant(root, "grow1", {**specs[0], e: torch.randn(13, 8)})
    d2 = _variant(root, "grow2", {**specs[1], e: torch.randn(14, 8)})
    _fails(tmp_path, FusionError, [e, "grow1", "grow2"], b=b, dirs=[d1, d2, dirs[2]])
    # NaN / inf in a specialist, in the base, in a tensor that is only copied
    for label, bad, who in (("nan", float("nan"), "spec"), ("inf", float("inf"), "base"), ("newnan", float("nan"), "new")):
        s = dict(specs[1] if who != "base" else base)
        if who == "new":
            s["extra.v"] = torch.tensor([1.0, bad])
        else:
            x = s[t].clone(); x[3, 4] = bad; s[t] = x
        d = _variant(root, label, s)
        name = "extra.v" if who == "new" else t
        args = dict(b=d, dirs=dirs) if who == "base" else dict(b=b, dirs=[dirs[0], d, dirs[2]])
        _fails(tmp_path, FusionError, [str(d / "model.safetensors"), name, "NaN" if bad != bad else "inf"], **args)


def test_bad_files_and_architectures(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    root = tmp_path / "bad"
    root.mkdir()
    # a shard listed by the index is missing
    d = _variant(root, "noshard", specs[1], shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    _fails(tmp_path, FileNotFoundError, [str(d / "model.safetensors.index.json"), "model-00002-of-00002.safetensors"],
           b=b, dirs=[dirs[0], d, dirs[2]])
    # pickle weights only; a pickle named like safetensors
    d = root / "pickle"
    d.mkdir()
    torch.save(specs[1], d / "pytorch_model.bin")
    _fails(tmp_path, FusionError, [str(d), "pytorch_model.bin", "pickle"], b=b, dirs=[dirs[0], d, dirs[2]])
    d = root / "pickle2"
    d.mkdir()
    torch.save(specs[1], d / "model.safetensors")
    _fails(tmp_path, FusionError, [str(d / "model.safetensors"), "pickle"], b=b, dirs=[dirs[0], d, dirs[2]])
    # a truncated safetensors file
    d = _variant(root, "trunc", specs[1])
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-10])
    _fails(tmp_path, FusionError, [str(d / "model.safetensors"), "truncated"], b=b, dirs=[dirs[0], d, dirs[2]])
    # a specialist of another architecture (same tensor shapes, different config)
    d = write_ckpt(root / "arch", specs[1], config={"model_type": "mistral", "hidden_size": 8, "num_hidden_layers": 2})
    _fails(tmp_path, FusionError, [str(d / "config.json"), "model_type", "mistral"], b=b, dirs=[dirs[0], d, dirs[2]])


def test_existing_destination_needs_overwrite(ckpts, tmp_path):
    b, dirs, base, specs = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(b, dirs, out)
    assert listing(out) == ["keep.txt"]
    run(b, dirs, out, overwrite=True)
    assert "model.safetensors" in listing(out) and "keep.txt" not in listing(out)
    with pytest.raises(FusionError, match="is the base model"):
        run(b, dirs, b, overwrite=True)


def test_interrupted_run_leaves_nothing(ckpts, tmp_path, monkeypatch):
    b, dirs, base, specs = ckpts
    calls = {"n": 0}
    real = ShardedWriter.write

    def flaky(self, data, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption mid-stream")
        return real(self, data, **kw)

    monkeypatch.setattr(ShardedWriter, "write", flaky)
    before = listing(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(b, dirs, tmp_path / "out", shard_size=600)
    assert listing(tmp_path) == before
    # an existing output survives an interrupted --overwrite run untouched
    monkeypatch.setattr(ShardedWriter, "write", real)
    run(b, dirs, tmp_path / "out")
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(ShardedWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(b, dirs, tmp_path / "out", overwrite=True, method="ties")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert listing(tmp_path) == sorted([*before, "out"])


def test_sigterm_mid_stream_cleans_up(ckpts, tmp_path, monkeypatch, capsys):
    """SLURM's time limit sends SIGTERM: the CLI stops, removes its temporary folder, exits 143."""
    b, dirs, base, specs = ckpts
    real = ShardedWriter.write
    calls = {"n": 0}

    def term(self, data, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, data, **kw)

    monkeypatch.setattr(ShardedWriter, "write", term)
    before = listing(tmp_path)
    rc = fusion.run_cli(FuseConfig(base=str(b), specialists=[str(d) for d in dirs], alpha=ALPHA,
                                   out=str(tmp_path / "out"), progress=False))
    assert rc == 143 and "nothing was written" in capsys.readouterr().err
    assert listing(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ----------------------------------------------------------------------------------------------- tiny omni
SPECIALIST_TRAINING = {  # what the shipped specialist configs train (recorded in the exported history)
    "image": ([], ["backbone"]),
    "video": ([], ["backbone"]),
    "document": ([], ["backbone"]),
    "audio": (["audio_encoder", "projector"], ["language_model"]),
}


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory):
    """runs/demo/{base, specialists/*} as `make demo` lays it out: the tiny base and four specialists whose
    weights moved where their configs train (embedding rows included, so new-token rows differ)."""
    from omni_lightning.demo import init_demo_model

    root = tmp_path_factory.mktemp("demo-layout")
    base = init_demo_model(root / "runs/demo/base", preset="tiny", seed=0)
    state = load_file(str(base / "model.safetensors"))
    prefixes = {"backbone": ("backbone.",), "language_model": ("backbone.language_model.",),
                "audio_encoder": ("audio_encoder.",), "projector": ("projector.",)}
    specs = {}
    for i, (m, (full, lora)) in enumerate(SPECIALIST_TRAINING.items()):
        d = root / "runs/demo/specialists" / m
        shutil.copytree(base, d)
        g = torch.Generator().manual_seed(100 + i)
        pre = tuple(p for part in full + lora for p in prefixes[part])
        st = {k: (v + 0.02 * torch.randn(v.shape, generator=g)) if k.startswith(pre) else v for k, v in state.items()}
        save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((d / "omni_config.json").read_text())
        cfg["history"].append({"step": "specialist", "modality": m, "train_parts": full,
                               "lora": {"parts": lora, "r": 8, "alpha": 8, "dropout": 0.0}})
        (d / "omni_config.json").write_text(json.dumps(cfg))
        (d / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text())
        specs[m] = st
    return root, state, specs


def test_shipped_config_parses_with_overrides():
    cfg = load_config(CONFIG)
    assert cfg.base == "runs/demo/base" and cfg.out == "runs/demo/fused" and cfg.method == "task_arithmetic"
    assert cfg.alpha == [0.3, 0.3, 0.3, 0.5]
    assert [Path(s).name for s in cfg.specialists] == ["image", "video", "document", "audio"]
    cfg = load_config(CONFIG, {"ties.density": 0.5, "parts.vision_encoder.mode": "keep_base", "method": "ties"})
    assert cfg.ties.density == 0.5 and cfg.parts["vision_encoder"].mode == "keep_base" and cfg.method == "ties"
    with pytest.raises(FusionError, match="ties.densty"):
        load_config(CONFIG, {"ties.densty": 0.5})
    with pytest.raises(FusionError, match="unknown key"):
        load_config(CONFIG, {"alpah": [1]})


def test_cli_fuses_tiny_omni_that_loads_and_encodes_every_modality(demo_layout, monkeypatch, capsys):
    from conftest import demo_items

    from omni_lightning.app.cli import main
    from omni_lightning.model import OmniEmbedder, OmniProcessor

    root, state, specs = demo_layout
    monkeypatch.chdir(root)
    rc = main(["fuse", "--config", str(CONFIG), "--out", "runs/demo/fused-cli", "--no-progress",
               "--shard_size", "1MB", "--alpha", "0.3", "0.3", "0.3", "0.5"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "cos audio" in printed and "audio_encoder <- audio" in printed
    out = root / "runs/demo/fused-cli"
    assert (out / "model.safetensors.index.json").is_file() and (out / "diagnostics.png").is_file()
    fused = load_dir(out)
    a = specs["audio"]
    # grafted parts copied bit-exactly from the audio specialist, new-token rows too; base rows fused
    for k in state:
        if k.startswith(("audio_encoder.", "projector.")):
            assert torch.equal(fused[k], a[k]), k
    emb = "backbone.language_model.embed_tokens.weight"
    cfg = json.loads((out / "omni_config.json").read_text())
    nb = cfg["base_vocab_size"]
    assert 0 < nb < state[emb].shape[0]
    assert torch.equal(fused[emb][nb:], a[emb][nb:]) and not torch.equal(fused[emb][nb:], specs["image"][emb][nb:])
    alphas = dict(zip(SPECIALIST_TRAINING, [0.3, 0.3, 0.3, 0.5]))
    for k in (emb, "backbone.language_model.layers.3.mlp.down_proj.weight", "backbone.visual.blocks.1.mlp.linear_fc1.weight"):
        rows = slice(0, nb) if k == emb else slice(None)
        b0 = state[k][rows]
        ref = b0.double().numpy().reshape(-1) + sum(alphas[m] * f32_delta(specs[m][k][rows], b0) for m in alphas)
        assert_matches(fused[k][rows], ref)
    rec = cfg["history"][-1]
    assert rec["step"] == "fuse" and rec["coefficients"] == alphas and len(rec["base"]["hash"]) == 64
    assert rec["owners"] == {"audio_encoder": "audio", "projector": "audio", "new_tokens": "audio"}
    diag = json.loads((out / "diagnostics.json").read_text())
    tv = diag["task_vectors"]
    assert set(tv["norm"]) == set(alphas) and len(tv["layer_norm"]["audio"]["language_model"]) == 4
    assert tv["layer_norm"]["audio"]["vision_encoder"] == [0.0, 0.0]  # the audio specialist left vision alone

    model = OmniEmbedder.from_pretrained(out).eval()
    proc = OmniProcessor.from_pretrained(out, model.config)
    items = demo_items()
    assert {it["type"] for it in items} == {"text", "image", "document", "video", "audio"}
    emb_out = model.encode(proc, items, "Find the matching item.")
    assert emb_out.shape == (len(items), model.embedding_dim) and bool(torch.isfinite(emb_out).all())
    torch.testing.assert_close(emb_out.norm(dim=-1), torch.ones(len(items)))


def test_cli_diagnose_only_and_errors(demo_layout, monkeypatch, capsys, tmp_path):
    from omni_lightning.app.cli import main

    root, state, specs = demo_layout
    monkeypatch.chdir(root)
    rc = main(["fuse", "--config", str(CONFIG), "--diagnose-only", "--diagnostics-dir", str(tmp_path / "diag"),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "L2 norm" in printed and "per-layer norm language_model" in printed
    assert not (root / "runs/demo/fused").exists()
    assert json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["specialists"] == list(SPECIALIST_TRAINING)
    # a bad input through the CLI: exit code 2 and the message on stderr
    rc = main(["fuse", "--config", str(CONFIG), "--alpha", "0.3", "0.5", "--no-progress"])
    assert rc == 2 and "alpha has 2 coefficient(s) for 4 specialist(s)" in capsys.readouterr().err
    rc = main(["fuse", "--config", str(CONFIG), "--method", "ties", "--ties.density", "0", "--no-progress"])
    assert rc == 2 and "ties.density must be in (0, 1]" in capsys.readouterr().err


def test_omni_ownership_warnings_and_architecture(demo_layout, tmp_path):
    root, state, specs = demo_layout
    sp = root / "runs/demo/specialists"
    # an image specialist that (wrongly) changed the projector: its change is reported, the audio one wins
    rogue = tmp_path / "rogue-image"
    shutil.copytree(sp / "image", rogue)
    st = dict(specs["image"])
    k0 = next(k for k in sorted(st) if k.startswith("projector."))
    st[k0] = st[k0] + 1.0
    save_file(st, str(rogue / "model.safetensors"))
    res = run(root / "runs/demo/base", [rogue, sp / "audio"], tmp_path / "out", alpha=[0.3, 0.5])
    assert any("rogue-image changed tensor " + k0 in w for w in res.diagnostics["warnings"])
    assert torch.equal(load_dir(tmp_path / "out")[k0], specs["audio"][k0])
    # two specialists that both trained the projector: ambiguous owner, refused unless named
    both = tmp_path / "audio2"
    shutil.copytree(sp / "audio", both)
    with pytest.raises(FusionError, match=r"trained by several specialists \(audio, audio2\).*parts\.audio_encoder\.owner"):
        run(root / "runs/demo/base", [sp / "audio", both], tmp_path / "out2", alpha=[0.5, 0.5])
    run(root / "runs/demo/base", [sp / "audio", both], tmp_path / "out2", alpha=[0.5, 0.5],
        parts={"audio_encoder": {"owner": "audio2"}, "projector": {"owner": "audio2"}})
    # a specialist built on another backbone configuration
    other = tmp_path / "other-arch"
    shutil.copytree(sp / "video", other)
    cfg = json.loads((other / "omni_config.json").read_text())
    cfg["backbone"]["text_config"]["num_attention_heads"] = 8
    (other / "omni_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FusionError, match=r"omni_config.json.*num_attention_heads"):
        run(root / "runs/demo/base", [other, sp / "audio"], tmp_path / "out3", alpha=[0.3, 0.5])
    # an omni base with a plain HF specialist
    plain = write_ckpt(tmp_path / "plain", {"w": torch.ones(2)})
    with pytest.raises(FusionError, match="not the same kind of model directory"):
        run(root / "runs/demo/base", [plain, sp / "audio"], tmp_path / "out4", alpha=[0.3, 0.5])


# ----------------------------------------------------------------------------------------------- slurm
def test_slurm_script_runs_end_to_end_under_a_stand_in_srun(demo_layout, tmp_path):
    root, state, specs = demo_layout
    script = REPO / "slurm" / "fuse.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    first_cmd = next(i for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.startswith("#"))
    assert all(text.splitlines().index(h) < first_cmd for h in header)  # directives precede the first command
    assert any("--mem=" in h for h in header) and any("--time=" in h for h in header)
    for var in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_TIMELIMIT", "SBATCH_MEM_PER_NODE"):
        assert var in text
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "srun.log"
    (bindir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "srun $*" >> "{log}"\n'
        'while [[ $# -gt 0 && "$1" == -* ]]; do shift; done\n'
        'exec "$@"\n'
    )
    (bindir / "srun").chmod(0o755)
    out = root / "runs/demo/fused"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "FUSE_CONFIG": str(CONFIG), "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "job 4242" in proc.stdout and "wrote fused model runs/demo/fused" in proc.stdout
    assert log.read_text().startswith("srun --ntasks=1") and "--io_threads 2" in log.read_text()
    assert (out / "diagnostics.json").is_file()
    rec = json.loads((out / "omni_config.json").read_text())["history"][-1]
    assert rec["step"] == "fuse" and rec["coefficients"]["audio"] == 0.5
    # extra arguments pass through to `omni-lightning fuse`; a second run refuses the existing output
    proc = subprocess.run(["bash", str(script), "--method", "ties"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr


# ----------------------------------------------------------------------------------------------- nothing lost
def test_an_output_that_holds_an_input_is_refused_before_anything_is_read(tmp_path):
    """--out equal to, containing, or inside an input (symlinks resolved) is refused and nothing is touched — even
    with --overwrite, which would otherwise replace the output folder."""
    b, dirs, _, _ = make_set(tmp_path / "p")
    (tmp_path / "link").symlink_to(tmp_path / "p")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*")}
    for out, how in ((tmp_path / "p", "contains"), (tmp_path / "link", "contains"), (dirs[0], "is"),
                     (dirs[1] / "sub", "lies inside")):
        with pytest.raises(FusionError, match=how):
            run(b, dirs, out, overwrite=True)
    with pytest.raises(FusionError, match="--diagnostics_dir"):
        run(b, dirs, tmp_path / "x", diagnose_only=True, diagnostics_dir=str(tmp_path / "p"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*")} == before


def test_a_killed_fuse_leaves_nothing_the_next_run_mistakes_for_a_result(tmp_path):
    """Temporary folders of a killed fuse are swept by the next fuse to the same output; while one fuse holds an
    output, a second one is refused. Outputs follow the user's umask."""
    from omni_lightning.utils import lock_output, unlock_output

    b, dirs, _, _ = make_set(tmp_path)
    out = tmp_path / "fused"
    stale = [tmp_path / ".fused.tmp-abc123", tmp_path / ".fused.old-999"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    lock = lock_output(out)
    try:
        with pytest.raises(FileExistsError, match="in progress"):
            run(b, dirs, out)
    finally:
        unlock_output(lock)
    assert all(d.exists() for d in stale)  # a live write's folders are never touched
    old = os.umask(0o022)
    try:
        run(b, dirs, out)
    finally:
        os.umask(old)
    assert not any(d.exists() for d in stale) and not list(tmp_path.glob(".fused.*"))
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "model.safetensors.index.json").exists()
                                                       or (out / "model.safetensors").exists())


def test_coefficients_that_overflow_the_output_dtype_are_an_error(tmp_path):
    """α = 1e6 on float16 weights gives inf: an error naming the tensor, and no output."""
    b, dirs, _, _ = make_set(tmp_path)
    with pytest.raises(FusionError, match=r"model\.layers\.0\.mlp\.bias has \d+ non-finite values in F16"):
        run(b, dirs, tmp_path / "out", alpha=[1e6, 1e6, 1e6])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_safetensors_header_of_length_128_is_not_taken_for_a_pickle(tmp_path):
    """The header length's first byte can be 0x80, the pickle opcode: the JSON that follows tells them apart."""
    from omni_lightning.fusion import read_header

    for pad in range(0, 200):  # find a header whose length is exactly 128
        t = {"w" + "x" * pad: torch.zeros(2)}
        save_file(t, str(tmp_path / "m.safetensors"))
        if (tmp_path / "m.safetensors").read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.skip("no header of length 128 found")
    header, start = read_header(tmp_path / "m.safetensors")
    assert start == 8 + 128 and len([k for k in header if k != "__metadata__"]) == 1
    torch.save({"w": torch.zeros(2)}, tmp_path / "p.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(FusionError, match="pickle"):
        read_header(tmp_path / "p.bin")
