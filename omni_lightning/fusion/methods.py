"""The merge methods, one class each, behind a name registry (:data:`REGISTRY`, :func:`make_method`).

The engine streams each fused tensor in cache-sized chunks of rows and hands a method, per chunk, θ₀'s rows
and the task vectors of the same rows as one float32 ``[M, n]`` matrix ``D``; the method writes the fused rows
into the accumulator. A method that needs a statistic of the *whole* tensor first (TIES' magnitude threshold)
says so with ``thresholded``: the engine then runs a first pass over each specialist's rows
(:meth:`MergeMethod.threshold_rows`, :meth:`MergeMethod.threshold_done`) before the chunks are merged. All
arithmetic is float32 and element-wise (TIES: given the threshold), so chunking never changes a result.

Adding a method: subclass :class:`MergeMethod`, give it a ``name``, implement :meth:`MergeMethod.merge`, and
add it to :data:`REGISTRY` (and its options to :class:`~omni_lightning.fusion.config.FuseConfig`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from omni_lightning.fusion.config import FuseConfig

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


def _ties_threshold(absbuf: torch.Tensor, k: int) -> tuple[float, int]:
    """(k-th largest value, how many of the entries equal to it are kept). Selects in place, no sort."""
    n = absbuf.numel()
    arr = absbuf.numpy()
    arr.partition(n - k)  # introselect: the k largest end up right of position n - k
    thr = float(arr[n - k])
    greater = int(np.count_nonzero(arr[n - k:] > thr))
    return thr, k - greater


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

    def drop(self, specialist: str, tensor: str, start: int, d: torch.Tensor) -> torch.Tensor:
        """DARE (``dare_p`` > 0): drop each element of Δ_m (flat elements ``start..`` of ``tensor``) with probability
        p and rescale the rest by 1/(1−p), in place. An element's mask depends only on (seed, specialist, tensor,
        element index), so neither the order of the specialists nor the chunking changes the result."""
        if self.dare_p > 0:
            p = self.dare_p
            d.mul_(dare_keep_mask(self.cfg.dare.seed, specialist, tensor, start, d.numel(), p)).mul_(1.0 / (1.0 - p))
        return d

    def threshold_rows(self, m: int, offset: int, d: torch.Tensor, total: int) -> None:
        """First pass: rows of Δ_m at flat ``offset`` of a fused tensor of ``total`` elements."""

    def threshold_done(self, m: int, total: int) -> None:
        """First pass: every row of Δ_m has been seen."""

    def end_tensor(self) -> None:
        """The current tensor is complete: drop its state."""

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
    entries with weights α_m; θ = θ₀ + ``scale`` · that mean."""

    name = "ties"

    def __init__(self, cfg: FuseConfig, dare_p: float = 0.0) -> None:
        super().__init__(cfg, dare_p)
        self.density = float(cfg.ties.density)
        self.thresholded = self.density < 1
        self.absbuf: torch.Tensor | None = None  # |Δ_m| of the whole tensor during the first pass
        self.thr: dict[int, tuple[float, int]] = {}  # m -> (threshold, how many entries equal to it are kept)
        self.eq_seen: dict[int, int] = {}  # m -> entries equal to the threshold seen so far in the merge pass

    def threshold_rows(self, m: int, offset: int, d: torch.Tensor, total: int) -> None:
        if self.absbuf is None or self.absbuf.numel() != total:
            self.absbuf = torch.empty(total, dtype=torch.float32)
        torch.abs(d, out=self.absbuf[offset : offset + d.numel()])

    def threshold_done(self, m: int, total: int) -> None:
        k = max(1, math.ceil(self.density * total))
        self.thr[m] = _ties_threshold(self.absbuf, k)
        self.eq_seen[m] = 0

    def end_tensor(self) -> None:
        self.absbuf = None
        self.thr.clear()
        self.eq_seen.clear()

    def _trim_mask(self, m: int, d: torch.Tensor) -> torch.Tensor:
        """Keep |Δ| > threshold, and of the entries equal to it the first ``quota`` in flat index order."""
        thr, quota = self.thr[m]
        a = d.abs()
        eq = a == thr
        n_eq = int(eq.sum())
        seen = self.eq_seen[m]
        self.eq_seen[m] = seen + n_eq
        if seen + n_eq <= quota:  # every tie in these rows is still within the quota
            return a >= thr
        keep = a > thr
        if seen < quota:
            keep |= eq & (torch.cumsum(eq, 0) <= quota - seen)
        return keep

    def merge(self, chunk: Chunk, acc: torch.Tensor) -> torch.Tensor:
        D, alphas, active = chunk.D, chunk.alphas, chunk.active()
        for m in active:
            self.drop(chunk.names[m - 1], chunk.tensor, chunk.start, D[m - 1])
            if self.thresholded:
                D[m - 1].mul_(self._trim_mask(m, D[m - 1]))
        n = chunk.base.numel()
        total = chunk.buffer("ties_sum", n)
        total.zero_()
        for m in active:
            total.add_(D[m - 1], alpha=alphas[m - 1])
        sign = torch.sign(total)
        num = chunk.buffer("ties_num", n)
        den = chunk.buffer("ties_den", n)
        num.zero_()
        den.zero_()
        for m in active:
            agree = (torch.sign(D[m - 1]) == sign) & (sign != 0)
            num.add_(D[m - 1] * agree, alpha=alphas[m - 1])
            den.add_(agree.to(torch.float32), alpha=alphas[m - 1])
        merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
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


def make_method(cfg: FuseConfig) -> MergeMethod:
    """The method ``cfg.method`` names, configured."""
    try:
        return REGISTRY[cfg.method](cfg)
    except KeyError:
        raise ValueError(f"unknown fusion method {cfg.method!r}; expected one of {sorted(REGISTRY)}") from None
