"""The merge methods, one class each, behind a name registry (:data:`REGISTRY`, :func:`make_method`).

The engine streams each fused tensor in cache-sized chunks of rows and hands a method, per chunk, θ₀'s rows
and the task vectors of the same rows as one float32 ``[M, n]`` matrix ``D``; the method writes the fused rows
into the accumulator. A method that needs a statistic of the *whole* tensor first (TIES' magnitude threshold)
says so with ``thresholded``: the engine then runs a first pass over the tensor, reading θ₀ and every active
specialist once — a sample of spread-out rows first, then the rest (:meth:`MergeMethod.threshold_rows`,
:meth:`MergeMethod.threshold_probed`, :meth:`MergeMethod.threshold_done`) — before the chunks are merged. All
arithmetic is float32 and element-wise (TIES: given the threshold), so chunking never changes a result.

Adding a method: subclass :class:`MergeMethod`, give it a ``name``, implement :meth:`MergeMethod.merge`, and
add it to :data:`REGISTRY` (and its options to :class:`~omni_lightning.fusion.config.FuseConfig`).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from omni_lightning.fusion.config import FuseConfig, FusionError

DARE_BLOCK = 1 << 20  # elements per independently seeded DARE random block


def _seed64(*parts: Any) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, specialist: str, tensor: str, start: int, n: int, p: float) -> torch.Tensor:
    """Bernoulli(1 − p) keep mask for flat elements ``[start, start + n)`` of one (specialist, tensor) delta.

    Element e is kept iff u ≥ p, where u is value ``e mod 2**20`` of ``torch.rand(2**20)`` drawn from a
    generator seeded with blake2b(seed, specialist, tensor, e // 2**20): independent of chunking and order."""
    out = torch.empty(n, dtype=torch.bool)
    e, end = start, start + n
    while e < end:
        blk = e // DARE_BLOCK
        lo = e - blk * DARE_BLOCK
        hi = min(DARE_BLOCK, end - blk * DARE_BLOCK)
        g = torch.Generator().manual_seed(_seed64(seed, specialist, tensor, blk))
        u = torch.rand(hi, generator=g)[lo:hi]
        torch.ge(u, p, out=out[e - start : e - start + (hi - lo)])
        e += hi - lo
    return out


class DareFactors:
    """DARE's per-element factor (1/(1−p) where :func:`dare_keep_mask` keeps the element, else 0), each random
    block drawn once however it is chunked: a block's generator stays open while its elements are consumed in
    order (``torch.rand(a)`` then ``torch.rand(b)`` from one generator = ``torch.rand(a + b)``), for the last
    ``slots`` blocks (4 MB each). With ``retain`` (TIES' two passes over a tensor), blocks leaving those slots
    keep their mask as bits (n/8 bytes per specialist for the current tensor, until :meth:`forget`), so the
    second pass draws no random number again. Δ·factor equals (Δ·mask)·(1/(1−p)) bit for bit."""

    def __init__(self, seed: int, p: float, slots: int = 8, retain: bool = False) -> None:
        self.seed, self.p, self.slots, self.retain = seed, float(p), max(1, slots), retain
        # u ≥ p (torch compares in float32) ⟺ u > the float32 just below p: threshold → u or 0, sign → 1 or 0
        self.below = float(np.nextafter(np.float32(self.p), np.float32(-np.inf)))
        self.scale = 1.0 / (1.0 - self.p)  # multiplied in float32, as Δ.mul_(1 / (1 − p)) does
        self.blocks: OrderedDict[tuple[str, str, int], list[Any]] = OrderedDict()  # key -> [gen, factors, drawn]
        self.packed: dict[tuple[str, str, int], tuple[np.ndarray, int]] = {}  # key -> (keep bits, drawn)

    def forget(self) -> None:
        self.blocks.clear()
        self.packed.clear()

    def _entry(self, key: tuple[str, str, int]) -> list[Any]:
        ent = self.blocks.get(key)
        if ent is not None:
            self.blocks.move_to_end(key)
            return ent
        ent = [None, torch.empty(DARE_BLOCK, dtype=torch.float32), 0]
        if key in self.packed:
            bits, drawn = self.packed.pop(key)
            np.multiply(np.unpackbits(bits, count=drawn), np.float32(self.scale), out=ent[1][:drawn].numpy())
            ent[2] = drawn
        self.blocks[key] = ent
        while len(self.blocks) > self.slots:
            old, (_, f, drawn) = self.blocks.popitem(last=False)
            if self.retain and drawn:
                self.packed[old] = (np.packbits(f[:drawn].numpy() != 0), drawn)
        return ent

    def factors(self, specialist: str, tensor: str, start: int, n: int) -> torch.Tensor:
        parts = []
        e, end = start, start + n
        while e < end:
            blk = e // DARE_BLOCK
            lo = e - blk * DARE_BLOCK
            hi = min(DARE_BLOCK, end - blk * DARE_BLOCK)
            ent = self._entry((specialist, tensor, blk))
            g, f, drawn = ent
            if drawn < hi:
                if g is None:  # a fresh block, or one restored from bits: (re)start its stream
                    g = ent[0] = torch.Generator().manual_seed(_seed64(self.seed, specialist, tensor, blk))
                    if drawn:
                        torch.rand(drawn, generator=g)  # skip what the bits already hold
                new = torch.rand(hi - drawn, generator=g, out=f[drawn:hi])
                torch.nn.functional.threshold_(new, self.below, 0.0).sign_().mul_(self.scale)
                ent[2] = hi
            parts.append(f[lo:hi])
            e += hi - lo
        return parts[0] if len(parts) == 1 else torch.cat(parts)


PROBE_ELEMS = 1 << 18  # |Δ| values per specialist sampled (in spread-out rows) before the full threshold pass
HOLD_ELEMS = 1 << 21  # tensors up to this many elements: every |Δ| is held and the k-th value selected directly
BRACKET_Z = 8.0  # half-width of a bracket around a sampled quantile, in binomial standard deviations ...
BRACKET_SLACK = 2e-3  # ... plus this fraction of the tensor (rows are not an i.i.d. sample)


def _ties_threshold(absbuf: torch.Tensor, k: int) -> tuple[float, int]:
    """(k-th largest value, how many of the entries equal to it are kept). Selects in place, no sort."""
    n = absbuf.numel()
    arr = absbuf.numpy()
    arr.partition(n - k)  # introselect: the k largest end up right of position n - k
    thr = float(arr[n - k])
    greater = int(np.count_nonzero(arr[n - k:] > thr))
    return thr, k - greater


def ties_k(density: float, n: int) -> int:
    """Entries TIES keeps of a task vector of n elements: k = ⌈density·n⌉ (at least 1)."""
    return max(1, math.ceil(density * n))


@dataclass(frozen=True)
class Threshold:
    """The trim of one task vector: keep |Δ| > ``value``, and of the ``ties`` entries equal to it the first
    ``quota`` in flat index order."""

    value: float
    quota: int
    ties: int


def radix_select(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """Exact k-th largest of non-negative float32 values streamed by ``chunks()`` (called twice: two passes),
    by a 2 × 16-bit radix select on their bit patterns (monotonic for non-negative floats): memory is two
    65536-bin histograms, whatever the number of values."""
    hi_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for a in chunks():
        hi_hist += torch.bincount((a.view(torch.int32) >> 16).long(), minlength=1 << 16)
    above = torch.flip(torch.cumsum(torch.flip(hi_hist, [0]), 0), [0])  # above[b] = values with high bits ≥ b
    b = int(torch.nonzero(above >= k).max())
    k_in = k - (int(above[b + 1]) if b + 1 < (1 << 16) else 0)  # rank within bin b
    lo_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for a in chunks():
        bits = a.view(torch.int32)
        low = bits[(bits >> 16) == b] & 0xFFFF
        lo_hist += torch.bincount(low.long(), minlength=1 << 16)
    above = torch.flip(torch.cumsum(torch.flip(lo_hist, [0]), 0), [0])
    low = int(torch.nonzero(above >= k_in).max())
    greater = int(above[low + 1]) if low + 1 < (1 << 16) else 0
    value = float(torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32))
    return Threshold(value, k_in - greater, int(lo_hist[low]))


class MagnitudeSelect:
    """The exact k-th largest |Δ| of one task vector of ``n`` elements, for several k at once, streamed chunk by
    chunk without holding the task vector (TIES' threshold; a density sweep asks for several k in one pass).

    Chunks may come in any order. A tensor of up to :data:`HOLD_ELEMS` elements is held and selected directly.
    For a larger one the first chunks (:meth:`add` with ``probe=True``: the engine sends about
    :data:`PROBE_ELEMS` values from rows spread over the tensor) are a sample whose order statistics bracket each
    k-th value; every value is then counted against the brackets ([> hi], [= hi], (lo, hi), [= lo]) and only the
    values inside a bracket (1–2 % of the tensor at density 0.2) are kept. :meth:`result` selects each k-th
    value exactly from the counts and the kept values; where a bracket missed (the sample misled), it returns None
    and the caller runs :func:`radix_select` over a second read."""

    def __init__(self, n: int, ks: list[int]) -> None:
        self.n, self.ks = n, list(ks)
        self.held: list[torch.Tensor] = []
        self.n_held = 0
        self.brackets: list[tuple[float, float]] | None = None
        self.counts: list[list[int]] = []  # per bracket: [> hi, = hi, = lo]
        self.closed: list[bool] = []  # per bracket: keep the values in [lo, hi] (else: count the ends)
        self.inner: list[list[torch.Tensor]] = []
        self.seen = 0

    def add(self, a: torch.Tensor, probe: bool = False) -> None:
        """|Δ| of some rows (float32; copied if held). ``probe``: part of the sample (before any other rows)."""
        self.seen += a.numel()
        if self.brackets is None and (probe or self.n <= HOLD_ELEMS):
            self.held.append(a.clone())
            self.n_held += a.numel()
            return
        self.end_probe()
        self._count(a)

    def end_probe(self) -> None:
        if self.brackets is not None or self.n <= HOLD_ELEMS:
            return
        sample = torch.cat(self.held).numpy() if self.held else np.zeros(0, np.float32)
        s = sample.size
        self.brackets = []
        if s:
            ranks = []
            for k in self.ks:
                q = k / self.n  # fraction of the tensor at or above the k-th value
                w = BRACKET_Z * math.sqrt(q * (1 - q) / s) + BRACKET_SLACK
                ranks.append((math.floor((q - w) * s), math.ceil((q + w) * s)))  # descending ranks of hi, lo
            idx = sorted({s - 1 - r for pair in ranks for r in pair if 0 <= r < s})
            if idx:
                sample.partition(idx)
            for r_hi, r_lo in ranks:
                hi = float(sample[s - 1 - r_hi]) if 0 <= r_hi < s else math.inf
                lo = float(sample[s - 1 - r_lo]) if 0 <= r_lo < s else -1.0
                self.brackets.append((lo, hi))
            # a bracket whose values [lo, hi] are expected to be few (≤ 5 % of the tensor) keeps them all (cheaper);
            # one with a heavily repeated value at an end (ties, zeros) counts the ends and keeps only the inside
            for lo, hi in self.brackets:
                n_in = int(np.count_nonzero((sample >= lo) & (sample <= hi)))
                self.closed.append(lo != hi and n_in <= s // 20)
        else:
            self.brackets = [(-1.0, math.inf)] * len(self.ks)
            self.closed = [True] * len(self.ks)
        self.counts = [[0, 0, 0] for _ in self.ks]
        self.inner = [[] for _ in self.ks]
        held, self.held = self.held, []
        for a in held:
            self._count(a)

    def _count(self, a: torch.Tensor) -> None:
        an = a.numpy()  # numpy's comparisons and counts are several times faster than torch's boolean kernels
        for j, (lo, hi) in enumerate(self.brackets):
            c = self.counts[j]
            lo32, hi32 = np.float32(lo), np.float32(hi)
            if self.closed[j]:  # keep [lo, hi], count > hi
                if math.isfinite(hi):
                    c[0] += int(np.count_nonzero(an > hi32))
                self.inner[j].append(torch.from_numpy(an[(an >= lo32) & (an <= hi32)] if lo >= 0 else an[an <= hi32]))
                continue
            sel = an
            if math.isfinite(hi):
                c[0] += int(np.count_nonzero(sel > hi32))
                c[1] += int(np.count_nonzero(sel == hi32))
            if lo >= 0 and lo != hi:
                c[2] += int(np.count_nonzero(sel == lo32))
            self.inner[j].append(torch.from_numpy(sel[(sel > lo32) & (sel < hi32)] if lo != hi else sel[:0]))

    def result(self) -> list[Threshold | None]:
        if self.seen != self.n:  # pragma: no cover - a programming error
            raise RuntimeError(f"threshold pass saw {self.seen} of {self.n} values")
        if self.brackets is None:  # everything held
            vals = torch.cat(self.held) if self.held else torch.zeros(0)
            self.held = []
            out = []
            for k in self.ks:
                thr, quota = _ties_threshold(vals, k)
                out.append(Threshold(thr, quota, int(torch.count_nonzero(vals == thr))))
            return out
        out = []
        for j, k in enumerate(self.ks):
            lo, hi = self.brackets[j]
            gt, eq_hi, eq_lo = self.counts[j]
            inner = torch.cat(self.inner[j]) if self.inner[j] else torch.zeros(0)
            if self.closed[j]:
                if gt < k <= gt + inner.numel():
                    thr, quota = _ties_threshold(inner, k - gt)
                    out.append(Threshold(thr, quota, int(torch.count_nonzero(inner == thr))))
                else:
                    out.append(None)
                continue
            if k <= gt:
                out.append(None)
            elif k <= gt + eq_hi:
                out.append(Threshold(hi, k - gt, eq_hi))
            elif k <= gt + eq_hi + inner.numel():
                thr, quota = _ties_threshold(inner, k - gt - eq_hi)
                out.append(Threshold(thr, quota, int(torch.count_nonzero(inner == thr))))
            elif lo >= 0 and lo != hi and k <= gt + eq_hi + inner.numel() + eq_lo:
                out.append(Threshold(lo, k - gt - eq_hi - inner.numel(), eq_lo))
            else:
                out.append(None)
        self.inner = []
        return out


class ThresholdCache:
    """TIES thresholds kept across fuses of the same inputs, for a density sweep: the first fuse computes, in its one
    threshold pass, the thresholds of every density in ``densities`` for every fused tensor and specialist; a later
    fuse with one of those densities (same inputs, same DARE settings) skips the threshold pass, so it reads each
    input once. Memory: three numbers per tensor, specialist and density. See :func:`~omni_lightning.fusion.engine.fuse_densities`."""

    def __init__(self, densities: Iterable[float]) -> None:
        self.densities = sorted({float(d) for d in densities})
        if not self.densities or not all(0 < d <= 1 for d in self.densities):
            raise FusionError(f"densities must be in (0, 1], got {self.densities}")
        self.key: tuple | None = None
        self.store: dict[tuple[str, str, int], dict[float, Threshold]] = {}  # (tensor, specialist, n) -> thresholds

    def bind(self, cfg: FuseConfig, dare_p: float) -> None:
        key = (str(cfg.base), tuple(map(str, cfg.specialists)), dare_p, cfg.dare.seed if dare_p else None)
        if self.key is None:
            self.key = key
        elif key != self.key:
            raise FusionError("a ThresholdCache serves fuses of the same base, specialists and DARE settings; "
                              f"it holds thresholds for {self.key}, this fuse is {key}")

    def get(self, tensor: str, specialist: str, n: int, density: float) -> Threshold | None:
        return self.store.get((tensor, specialist, n), {}).get(density)

    def put(self, tensor: str, specialist: str, n: int, density: float, thr: Threshold) -> None:
        self.store.setdefault((tensor, specialist, n), {})[density] = thr


@dataclass
class Chunk:
    """The rows of one fused tensor being merged: θ₀'s rows and the task vectors of the same rows."""

    tensor: str  # the output tensor's name
    start: int  # flat index of the chunk's first element in the tensor
    base: torch.Tensor  # θ₀'s rows, float32, flat
    D: torch.Tensor  # [M, n] float32: row m-1 is Δ_m = θ_m − θ₀ (methods may modify it in place)
    alphas: list[float]  # α_m per specialist
    names: list[str]  # the specialists' names
    specialist: Callable[[int], torch.Tensor]  # m -> θ_m's rows as float32 (exact, not base + Δ)
    buffer: Callable[[str, int], torch.Tensor]  # (key, n) -> a reused float32 work buffer
    total: int = 0  # elements of the tensor's fused rows (what TIES' k counts)

    def active(self) -> list[int]:
        """The specialists (1-based) with a non-zero coefficient."""
        return [m for m in range(1, len(self.alphas) + 1) if self.alphas[m - 1] != 0]


class MergeMethod:
    """θ = merge(θ₀, Δ_1..Δ_M, α_1..α_M), chunk by chunk."""

    name: str = ""
    thresholded = False  # True: a first pass per specialist over each whole tensor precedes the merge

    def __init__(self, cfg: FuseConfig, dare_p: float = 0.0) -> None:
        self.cfg = cfg
        self.dare_p = float(dare_p)
        self.dare = (DareFactors(cfg.dare.seed, self.dare_p, slots=2 * len(cfg.specialists) + 2,
                                 retain=self.name == "ties" and cfg.ties.density < 1) if self.dare_p > 0 else None)

    def drop(self, specialist: str, tensor: str, start: int, d: torch.Tensor) -> torch.Tensor:
        """DARE (``dare_p`` > 0): drop each element of Δ_m (flat elements ``start..`` of ``tensor``) with probability
        p and rescale the rest by 1/(1−p), in place. An element's mask depends only on (seed, specialist, tensor,
        element index), so neither the order of the specialists nor the chunking changes the result."""
        if self.dare_p > 0:
            d.mul_(self.dare.factors(specialist, tensor, start, d.numel()))
        return d

    def threshold_rows(self, m: int, offset: int, d: torch.Tensor, total: int, probe: bool = False) -> None:
        """First pass: rows of Δ_m at flat ``offset`` of a fused tensor of ``total`` elements, in any order:
        first the sample rows (``probe``), then the rest."""

    def needs_threshold_pass(self, tensor: str, specialists: list[str], total: int) -> bool:
        """Whether a first pass over this tensor is needed (False where the thresholds are known already)."""
        return self.thresholded

    def threshold_probed(self, m: int) -> None:
        """First pass: the sample rows of Δ_m (``probe=True``) have all been seen; the other rows follow."""

    def threshold_done(self, m: int, total: int, reread: Callable[[], Iterable[torch.Tensor]] | None = None,
                       tensor: str = "", specialist: str = "") -> None:
        """First pass: every row of Δ_m has been seen (``reread``: |Δ_m| once more, chunk by chunk, if needed)."""

    def end_tensor(self) -> None:
        """The current tensor is complete: drop its state."""
        if self.dare is not None:
            self.dare.forget()

    def merge(self, chunk: Chunk, acc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TaskArithmetic(MergeMethod):
    """θ₀ + Σ_m α_m Δ_m (the paper's choice)."""

    name = "task_arithmetic"

    def merge(self, chunk: Chunk, acc: torch.Tensor) -> torch.Tensor:
        first = True
        for m in chunk.active():
            d = self.drop(chunk.names[m - 1], chunk.tensor, chunk.start, chunk.D[m - 1])
            if first:
                torch.add(chunk.base, d, alpha=chunk.alphas[m - 1], out=acc)
                first = False
            else:
                acc.add_(d, alpha=chunk.alphas[m - 1])
        if first:
            acc.copy_(chunk.base)
        return acc


class Ties(MergeMethod):
    """TIES: trim each Δ_m to its top-``density`` magnitudes (exactly k = ⌈density·n⌉ entries per tensor, ties at
    the threshold kept lowest flat index first), elect a sign per element by Σ α_m Δ̂_m, and average the agreeing
    entries with weights α_m; θ = θ₀ + ``scale`` · that mean.

    The thresholds come from one streamed pass per tensor (:class:`MagnitudeSelect`, all specialists at once);
    ``densities`` (default: ``cfg.ties.density`` alone) asks that pass for the thresholds of several densities,
    kept in :attr:`thresholds` (m -> one :class:`Threshold` per density); the merge uses the first."""

    name = "ties"

    def __init__(self, cfg: FuseConfig, dare_p: float = 0.0, densities: list[float] | None = None) -> None:
        super().__init__(cfg, dare_p)
        self.densities = [float(d) for d in (densities or [cfg.ties.density])]
        self.density = self.densities[0]
        self.thresholded = min(self.densities) < 1
        self.select: dict[int, MagnitudeSelect] = {}  # m -> the threshold pass of Δ_m over the current tensor
        self.thresholds: dict[int, list[Threshold]] = {}  # m -> one threshold per density
        self.eq_seen: dict[int, int] = {}  # m -> entries equal to the threshold seen so far in the merge pass
        self.cache: ThresholdCache | None = None

    def use_cache(self, cache: ThresholdCache) -> None:
        """Take thresholds from ``cache`` where it has them, and compute (and store) its densities with ours."""
        cache.bind(self.cfg, self.dare_p)
        self.cache = cache
        self.densities = [self.density] + [d for d in cache.densities if d != self.density]

    def needs_threshold_pass(self, tensor: str, specialists: list[str], total: int) -> bool:
        return self.thresholded and (self.cache is None or any(
            self.cache.get(tensor, s, total, self.density) is None for s in specialists))

    def threshold_rows(self, m: int, offset: int, d: torch.Tensor, total: int, probe: bool = False) -> None:
        sel = self.select.get(m)
        if sel is None:
            sel = self.select[m] = MagnitudeSelect(total, [ties_k(x, total) for x in self.densities])
        sel.add(d.abs_(), probe)  # d: the engine's scratch rows

    def threshold_probed(self, m: int) -> None:
        self.select[m].end_probe()

    def threshold_done(self, m: int, total: int, reread: Callable[[], Iterable[torch.Tensor]] | None = None,
                       tensor: str = "", specialist: str = "") -> None:
        """Every row of Δ_m was seen. ``reread``: |Δ_m| again, chunk by chunk (used only where a bracket missed)."""
        sel = self.select.pop(m)
        res = sel.result()
        for i, r in enumerate(res):
            if r is None:
                if reread is None:  # pragma: no cover - a programming error
                    raise RuntimeError("the TIES threshold bracket missed and no second read was offered")
                res[i] = radix_select(reread, sel.ks[i])
        self.thresholds[m] = res
        self.eq_seen[m] = 0
        if self.cache is not None:
            for d, r in zip(self.densities, res):
                self.cache.put(tensor, specialist, total, d, r)

    def end_tensor(self) -> None:
        super().end_tensor()
        self.select.clear()
        self.thresholds.clear()
        self.eq_seen.clear()

    def _trim(self, m: int, d: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> None:
        """Zero, in place, all but |Δ| > threshold and, of the entries equal to it, the first ``quota`` in flat
        index order (``a``, ``s``: work buffers). Float arithmetic only where it can (torch's boolean kernels
        cost ten times as much): kept = threshold(|Δ|, just below the threshold value, 0) · sign(Δ)."""
        t = self.thresholds[m][0]
        torch.abs(d, out=a)
        below = float(np.nextafter(np.float32(t.value), np.float32(-np.inf)))  # a > below ⟺ a ≥ value
        cut = below
        if t.quota != t.ties:  # not every entry equal to the threshold is kept: count them in flat order
            n_eq = int(np.count_nonzero(a.numpy() == np.float32(t.value)))
            seen = self.eq_seen[m]
            self.eq_seen[m] = seen + n_eq
            if seen >= t.quota:  # the quota is used up: strictly greater only
                cut = t.value
            elif seen + n_eq > t.quota:  # the quota runs out inside these rows
                eq = a == t.value
                keep = (a > t.value) | (eq & (torch.cumsum(eq, 0) <= t.quota - seen))
                d.mul_(keep)
                return
        torch.nn.functional.threshold_(a, cut, 0.0)  # |Δ| where kept, else 0
        torch.mul(a, torch.sign(d, out=s), out=d)

    def merge(self, chunk: Chunk, acc: torch.Tensor) -> torch.Tensor:
        # Bit-identical to the textbook form (sign(Δ̂_m) == sign(Σ) & sign(Σ) != 0 as the agreement mask, num +=
        # α_m·Δ̂_m·agree, den += α_m·agree, θ₀ + scale·where(den > 0, num / den, 0)) with fewer passes: Δ̂_m agrees
        # iff p = Δ̂_m·sign(Σ) > 0, so max(p, 0) is |Δ̂_m|·agree and max(p, 0)·sign(Σ) is Δ̂_m·agree; only the sign
        # of zero terms differs, and adding ±0 to the accumulators (which start at +0) changes no bit.
        D, alphas, active = chunk.D, chunk.alphas, chunk.active()
        n = chunk.base.numel()
        a = chunk.buffer("ties_abs", n)
        for m in active:
            self.drop(chunk.names[m - 1], chunk.tensor, chunk.start, D[m - 1])
            if self.thresholded:
                if m not in self.thresholds:  # no threshold pass over this tensor: the cache has them
                    self.thresholds[m] = [self.cache.get(chunk.tensor, chunk.names[m - 1], chunk.total, self.density)]
                    self.eq_seen[m] = 0
                self._trim(m, D[m - 1], a, chunk.buffer("ties_sign", n))
        total = chunk.buffer("ties_sum", n)
        total.zero_()
        for m in active:
            total.add_(D[m - 1], alpha=alphas[m - 1])
        sign = torch.sign(total, out=chunk.buffer("ties_sign", n))
        num = chunk.buffer("ties_num", n)
        den = chunk.buffer("ties_den", n)
        num.zero_()
        den.zero_()
        for m in active:
            p = torch.mul(D[m - 1], sign, out=a).clamp_min_(0.0)  # |Δ̂_m| where it agrees, else 0
            den.add_(torch.sign(p, out=total), alpha=alphas[m - 1])  # total: no longer needed, reused
            num.add_(p.mul_(sign), alpha=alphas[m - 1])
        # where(den > 0, num / den, 0) without a boolean kernel: ok = max(sign(den), 0) ∈ {0, 1}; q·ok + 0 is q
        # where ok = 1 and +0 where ok = 0 (q·0 may be -0; -0 + +0 = +0)
        ok = torch.sign(den, out=total).clamp_min_(0.0)
        merged = num.div_(den.clamp_min_(torch.finfo(torch.float32).tiny)).mul_(ok).add_(0.0)
        return torch.add(chunk.base, merged, alpha=float(self.cfg.ties.scale), out=acc)


class Linear(MergeMethod):
    """(w₀ θ₀ + Σ_m α_m θ_m) / (w₀ + Σ_m α_m): a weighted average of the full weights."""

    name = "linear"

    def merge(self, chunk: Chunk, acc: torch.Tensor) -> torch.Tensor:
        w0 = float(self.cfg.linear.base_weight)
        torch.mul(chunk.base, w0, out=acc)
        for m in range(1, len(chunk.alphas) + 1):
            acc.add_(chunk.specialist(m), alpha=chunk.alphas[m - 1])
        return acc.div_(w0 + sum(chunk.alphas))


def dare(cfg: FuseConfig) -> MergeMethod:
    """DARE: the random drop of :meth:`MergeMethod.drop`, then task arithmetic or TIES (``dare.combine``)."""
    return (Ties if cfg.dare.combine == "ties" else TaskArithmetic)(cfg, dare_p=cfg.dare.p)


REGISTRY: dict[str, Callable[[FuseConfig], MergeMethod]] = {
    "task_arithmetic": TaskArithmetic, "ties": Ties, "dare": dare, "linear": Linear,
}


def make_method(cfg: FuseConfig, thresholds: ThresholdCache | None = None) -> MergeMethod:
    """The method ``cfg.method`` names, configured (TIES, alone or after DARE: with a ``thresholds`` cache)."""
    try:
        method = REGISTRY[cfg.method](cfg)
    except KeyError:
        raise ValueError(f"unknown fusion method {cfg.method!r}; expected one of {sorted(REGISTRY)}") from None
    if thresholds is not None and isinstance(method, Ties) and method.thresholded:
        method.use_cache(thresholds)
    return method
