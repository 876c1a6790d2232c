"""The fusion engine: Decoupled Specialist Fusion: merge specialists' task vectors into one model, streaming safetensors.

``omni-lightning fuse --config configs/fuse.yaml`` (see that file for every option) or, from Python::

    from omni_lightning.fusion import FuseConfig, fuse
    fuse(FuseConfig(base="runs/demo/base", specialists=["runs/demo/specialists/image", ...],
                    alpha=[0.3, ...], out="runs/demo/fused"))

**Methods** (all arithmetic in float32 whatever the stored dtype; results written back in the base's dtype).
With task vectors Δ_m = θ_m − θ₀ and coefficients α_m:

* ``task_arithmetic``: θ₀ + Σ_m α_m Δ_m (the paper's choice);
* ``ties``: per tensor, each Δ_m is trimmed to its top-``density`` magnitudes (exactly k = ⌈density·n⌉
  entries, ties at the threshold broken by flat index, lowest first); the sign of each element is elected by
  Σ_m α_m Δ̂_m; the agreeing entries are averaged with weights α_m (Σ α_m Δ̂_m / Σ α_m over agreeing m);
  θ = θ₀ + ``scale`` · that mean;
* ``dare``: each delta element is dropped with probability p and the rest rescaled by 1/(1−p), then
  combined by ``task_arithmetic`` or ``ties`` (``dare.combine``); the random mask of an element depends only on
  (seed, specialist name, tensor name, element index), so neither the order of the specialists nor the
  chunking changes the result;
* ``linear``: (w₀ θ₀ + Σ_m α_m θ_m) / (w₀ + Σ_m α_m), a weighted average of the full weights.

**Ownership.** Tensors pair by name (else by the name without wrapper prefixes such as ``model.`` and
``language_model.``, which differ between hub files and transformers 5 modules; the output keeps θ₀'s names).
Every tensor of θ₀ is fused unless a part rule says otherwise. A tensor absent from θ₀ is
copied bit-exactly from the one specialist that has it (two specialists adding it is an error). Rows that a
specialist added to an embedding matrix (new tokens) are copied from it while the base rows are fused.
Model directories describe themselves: in an omni-lightning model directory (``omni_config.json``) the parts
``audio_encoder`` and ``projector`` are grafted modules (in the paper they do not exist in θ₀) and the
embedding rows from ``base_vocab_size`` on are the audio tokens, so they are copied from the specialist whose
history records training those parts (``parts: {projector: {owner: NAME}}`` names it explicitly). Plain
Hugging Face safetensors checkpoints have no such description: ownership comes from tensor presence alone.

**Streaming.** Input headers are parsed and validated first (nothing is written before every metadata check
passes). Tensors are then read in blocks of rows with ``pread`` into reused buffers (``io_threads`` read and
hash the next blocks of every input while the current one is merged, ``chunk_mb`` at a time so the work
buffers stay in the CPU cache) and written by a writer thread into pre-planned safetensors shards, so peak
memory is a few blocks, plus for TIES the magnitudes near each threshold (1–2 % of the tensor being
thresholded: see :class:`~omni_lightning.fusion.methods.MagnitudeSelect`) — not the model. NaN/inf in any input is found while streaming. The output is assembled in a temporary folder
beside the destination (its ranges flushed to disk as they are written) and renamed at the end.

**Diagnostics** (``diagnostics.json`` + ``diagnostics.png`` in the output folder, or ``--diagnose-only``):
per specialist the global L2 norm of its task vector (over the fused tensors), pairwise cosines, and norms
per part and per layer — the evidence the paper uses for Projector Drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from omni_lightning.fusion import methods as _methods
from omni_lightning.fusion.checkpoint import DTYPES
from omni_lightning.fusion.config import (
    FuseConfig,
    FusionError,
    parse_size,
)
from omni_lightning.fusion.diagnostics import (
    DIAGNOSTICS_JSON,
    DIAGNOSTICS_PNG,
    _diagnostics,
    _Stats,
    format_diagnostics,
    plot_diagnostics,
)
from omni_lightning.fusion.methods import DARE_BLOCK, Chunk, ThresholdCache, make_method
from omni_lightning.fusion.plan import Plan, Segment, TensorPlan, _Task, build_plan
from omni_lightning.fusion.reader import _nonfinite, _Reader, _typed, read_rows
from omni_lightning.fusion.writer import ShardedWriter
from omni_lightning.model.config import CONFIG_NAME, OmniConfig
from omni_lightning.model.omni import WEIGHTS_INDEX_NAME
from omni_lightning.utils import (
    atomic_write_text,
    dir_mode,
    lock_output,
    remove_leftovers,
    unlock_output,
)


class _Workspace:
    """Reused float32 work buffers (allocating fresh ones per chunk costs more than the arithmetic)."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = self._bufs.get(key)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = torch.empty(n, dtype=dtype)
            self._bufs[key] = b
        return b[:n]



class _Engine:
    def __init__(self, plan: Plan, writer: ShardedWriter | None, diagnose_only: bool,
                 thresholds: ThresholdCache | None = None) -> None:
        self.plan, self.writer, self.diagnose_only = plan, writer, diagnose_only
        cfg = plan.cfg
        self.M = len(plan.inputs) - 1
        self.ws = _Workspace()
        self.chunk = max(1, int(cfg.chunk_mb * 1e6 / 4))
        self.read_bytes = max(1, int(cfg.read_mb * 1e6))
        self.method = make_method(cfg, thresholds)
        self.stats = _Stats(plan.names[1:])
        self.warnings: list[str] = []
        self.counts = {"fused": 0, "copied": 0, "kept": 0, "added": 0}
        self.pass1_left: dict[str, int] = {}  # tensor -> pass-1 tasks not yet merged

    # ---------------------------------------------------------------- task stream
    def rows_per_chunk(self, t: TensorPlan) -> int:
        """Rows merged at a time (cache-sized work buffers)."""
        return max(1, self.chunk // max(1, t.row_numel))

    def rows_per_read(self, t: TensorPlan) -> int:
        """Rows read at a time (large reads: fewer hand-offs between threads), a multiple of rows_per_chunk."""
        rpc = self.rows_per_chunk(t)
        row_bytes = t.row_numel * max(DTYPES[i.dtype][1] for i in t.inputs.values())
        return rpc * max(1, self.read_bytes // max(1, rpc * row_bytes))

    def tasks(self) -> Iterator[_Task]:
        order = self.writer.order if self.writer is not None else self.plan.tensors
        for t in order:
            segs = t.segments
            if self.diagnose_only:
                segs = [s for s in segs if s.kind == "fuse"]
                if not segs:
                    continue
            rpr = self.rows_per_read(t)
            fuse = [s for s in segs if s.kind == "fuse"]
            if self.method.thresholded and fuse and not self.diagnose_only:
                yield from self.threshold_tasks(t, fuse[0], rpr)
            chunks = [(s, r0, min(s.r1, r0 + rpr)) for s in segs for r0 in range(s.r0, s.r1, rpr)]
            if not chunks:  # zero-size tensor
                yield _Task(t, Segment(0, 0, "copy"), 0, 0, (), "main", first=True, last=True)
            for k, (s, r0, r1) in enumerate(chunks):
                yield _Task(t, s, r0, r1, s.reads, "main", first=k == 0, last=k == len(chunks) - 1)

    # ---------------------------------------------------------------- deltas
    def _delta(self, t: TensorPlan, m: int, raw: torch.Tensor, base_f: torch.Tensor, rows: int,
               out: torch.Tensor) -> torch.Tensor:
        """Δ_m for the rows (float32, into ``out``)."""
        return out.copy_(_typed(raw, t.inputs[m], rows)).sub_(base_f)

    # ---------------------------------------------------------------- per task
    def _sub_chunks(self, task: _Task, raws: dict[int, torch.Tensor]):
        """(r0, r1, raws of those rows) for the cache-sized sub-chunks of one read block."""
        t = task.tensor
        rpc = self.rows_per_chunk(t)
        for r0 in range(task.r0, task.r1, rpc):
            r1 = min(task.r1, r0 + rpc)
            sub = {}
            for i, raw in raws.items():
                rb = t.row_numel * DTYPES[t.inputs[i].dtype][1]
                sub[i] = raw[(r0 - task.r0) * rb : (r1 - task.r0) * rb]
            yield r0, r1, sub

    def threshold_tasks(self, t: TensorPlan, seg: Segment, rpr: int) -> Iterator[_Task]:
        """Pass 1 (TIES' thresholds) over the fused rows: one read of θ₀ and of every active specialist. First a
        sample of rows spread over the tensor (stage "probe", about PROBE_ELEMS elements in 16 runs of rows, each
        at the start of a DARE random block where it can be, so the sample draws few random numbers), then the
        rows between them (stage "thr"); every row exactly once."""
        active = tuple(m for m in range(1, self.M + 1) if t.alphas[m - 1] != 0)
        n_fused = (seg.r1 - seg.r0) * t.row_numel
        if not active or not self.method.needs_threshold_pass(t.name, [self.plan.names[m] for m in active], n_fused):
            return
        reads = (0, *active)
        rows = seg.r1 - seg.r0
        n = rows * t.row_numel
        probes: list[tuple[int, int]] = []
        if n > _methods.HOLD_ELEMS:
            runs = 16
            run_rows = max(1, _methods.PROBE_ELEMS // runs // t.row_numel)
            for i in range(runs):
                e = (seg.r0 * t.row_numel + i * n // runs) // DARE_BLOCK * DARE_BLOCK  # a DARE block start
                r0 = max(-(-e // t.row_numel), probes[-1][1] if probes else seg.r0)
                r1 = min(seg.r1, r0 + run_rows)
                if r0 < r1:
                    probes.append((r0, r1))
        tasks = [_Task(t, seg, r0, r1, reads, "probe", 0, last=k == len(probes) - 1) for k, (r0, r1) in enumerate(probes)]
        gaps, prev = [], seg.r0
        for r0, r1 in [*probes, (seg.r1, seg.r1)]:
            gaps += [(g, min(r0, g + rpr)) for g in range(prev, r0, rpr)]
            prev = r1
        tasks += [_Task(t, seg, r0, r1, reads, "thr", 0) for r0, r1 in gaps]
        self.pass1_left[t.name] = len(tasks)
        yield from tasks

    def run_thr(self, task: _Task, raws: dict[int, torch.Tensor]) -> None:
        t, seg = task.tensor, task.seg
        active = task.reads[1:]
        n_fused = (seg.r1 - seg.r0) * t.row_numel
        probe = task.stage == "probe"
        for r0, r1, sub in self._sub_chunks(task, raws):
            rows = r1 - r0
            n = rows * t.row_numel
            base_f = self.ws.get("base", n)
            base_f.copy_(_typed(sub[0], t.inputs[0], rows))
            for m in active:
                d = self._delta(t, m, sub[m], base_f, rows, self.ws.get(("d", m), n))
                self.method.drop(self.plan.names[m], t.name, r0 * t.row_numel, d)
                self.method.threshold_rows(m, (r0 - seg.r0) * t.row_numel, d, n_fused, probe)
        if probe and task.last:
            for m in active:
                self.method.threshold_probed(m)
        self.pass1_left[t.name] -= 1
        if not self.pass1_left[t.name]:
            del self.pass1_left[t.name]
            for m in active:
                self.method.threshold_done(m, n_fused, lambda m=m: self._reread_abs(t, seg, m), t.name,
                                           self.plan.names[m])

    def _reread_abs(self, t: TensorPlan, seg: Segment, m: int) -> Iterator[torch.Tensor]:
        """|Δ_m| over the fused rows once more, read synchronously (only where a sampled bracket missed)."""
        rpc = self.rows_per_chunk(t)
        for r0 in range(seg.r0, seg.r1, rpc):
            r1 = min(seg.r1, r0 + rpc)
            rows = r1 - r0
            n = rows * t.row_numel
            base_f = self.ws.get("reread_base", n)
            base_f.copy_(_typed(read_rows(t.inputs[0], r0, r1), t.inputs[0], rows))
            d = self.ws.get("reread_d", n)
            torch.sub(_typed(read_rows(t.inputs[m], r0, r1), t.inputs[m], rows), base_f, out=d)
            self.method.drop(self.plan.names[m], t.name, r0 * t.row_numel, d)
            yield d.abs_()

    def run_main(self, task: _Task, raws: dict[int, torch.Tensor]) -> int:
        t, seg = task.tensor, task.seg
        written = 0
        if task.first and self.writer is not None:
            self.writer.begin(t)
        for r0, r1, sub in self._sub_chunks(task, raws):
            rows = r1 - r0
            n = rows * t.row_numel
            if seg.kind == "fuse":
                out = self._fuse(t, sub, r0, rows, n)
                if self.writer is not None:
                    written += self.writer.write(out, owned=t.dtype != "F32")  # F32: the reused accumulator
            else:
                written += self._copy(t, seg, sub, r0, rows, n)
        if task.last:
            if self.writer is not None:
                self.writer.end()
            kind = t.rule.split(":")[0].split(";")[0].split(" ")[0]
            self.counts[{"fuse": "fused", "keep_base": "kept", "copy": "copied", "new": "added"}.get(kind, "kept")] += 1
            self.method.end_tensor()
        return written

    def _copy(self, t: TensorPlan, seg: Segment, raws: dict[int, torch.Tensor], r0: int, rows: int, n: int) -> int:
        for i, raw in raws.items():
            if t.inputs[i].family == "float":
                f = self.ws.get("check", n)
                f.copy_(_typed(raw, t.inputs[i], rows))
                if not math.isfinite(float(f.sum())):
                    _nonfinite(self.plan, i, t, raw, r0, rows)
        for i in t.unchanged:
            if i in raws and 0 in raws and not torch.equal(raws[i], raws[0]) and seg.src != i:
                msg = (f"{self.plan.names[i]} changed tensor {t.name} ({t.rule}); that change is not in the output")
                if msg not in self.warnings:
                    self.warnings.append(msg)
        if self.writer is None:
            return 0
        src = raws[seg.src]
        info = t.inputs[seg.src]
        if info.dtype == t.dtype:
            return self.writer.write(src)  # copied by the writer: the read buffer is reused
        return self.writer.write(_typed(src, info, rows).to(DTYPES[t.dtype][0]), owned=True)

    def _fuse(self, t: TensorPlan, raws: dict[int, torch.Tensor], r0: int, rows: int, n: int) -> torch.Tensor:
        M = self.M
        base_f = self.ws.get("base", n)
        base_f.copy_(_typed(raws[0], t.inputs[0], rows))
        # the task vectors of these rows as one contiguous [M, n] float32 matrix (cache-sized: see chunk_mb)
        D = self.ws.get("D", M * n).view(M, n)
        for m in range(1, M + 1):
            D[m - 1].copy_(_typed(raws[m], t.inputs[m], rows)).sub_(base_f)
        # squared norms and pairwise dots of the raw task vectors in one GEMM; also a free NaN/inf check of
        # every input (Δ = θ_m − θ₀ is non-finite wherever θ_m or θ₀ is)
        gram = D @ D.T
        if not bool(torch.isfinite(gram).all()):
            for i in range(M + 1):
                _nonfinite(self.plan, i, t, raws[i], r0, rows)
            gram = D.double() @ D.double().T  # finite inputs, float32 overflow of the products only
        self.stats.add(t, gram)
        self.stats.numel += n
        if self.diagnose_only:
            return base_f
        def specialist(m: int) -> torch.Tensor:
            buf = self.ws.get("spec", n)
            return buf.copy_(_typed(raws[m], t.inputs[m], rows))

        fused = next((s for s in t.segments if s.kind == "fuse"), None)
        total = (fused.r1 - fused.r0) * t.row_numel if fused is not None else n
        chunk = Chunk(t.name, r0 * t.row_numel, base_f, D, t.alphas, self.plan.names[1:], specialist, self.ws.get,
                      total)
        acc = self.method.merge(chunk, self.ws.get("acc", n))
        out = acc if t.dtype == "F32" else acc.to(DTYPES[t.dtype][0])
        bad = ~torch.isfinite(out)
        if bool(bad.any()):  # finite inputs, non-finite result: the coefficients overflow the output dtype
            raise FusionError(f"fused tensor {t.name} has {int(bad.sum())} non-finite values in {t.dtype} (rows {r0}.."
                              f"{r0 + rows - 1}): the coefficients {dict(zip(self.plan.names[1:], t.alphas))} overflow "
                              "the output dtype; use smaller coefficients or float32 weights. Nothing was written")
        return out


# ============================================================================================ entry points
@dataclass
class FuseResult:
    out: Path | None
    diagnostics: dict[str, Any]


def _record(plan: Plan, hashes: dict[str, str | None]) -> dict[str, Any]:
    cfg = plan.cfg
    params: dict[str, Any] = {}
    if cfg.method in ("ties",) or (cfg.method == "dare" and cfg.dare.combine == "ties"):
        params["ties"] = dataclasses.asdict(cfg.ties)
    if cfg.method == "dare":
        params["dare"] = dataclasses.asdict(cfg.dare)
    if cfg.method == "linear":
        params["linear"] = dataclasses.asdict(cfg.linear)
    return {
        "step": "fuse",
        "method": cfg.method,
        "params": params,
        "coefficients": dict(zip(cfg.names, cfg.alpha)),
        "parts": {k: dataclasses.asdict(v) for k, v in cfg.parts.items()},
        "owners": dict(plan.owners),
        "base": {"path": str(plan.inputs[0].path.resolve()), "hash": hashes.get("base")},
        "specialists": [
            {"name": n, "path": str(plan.inputs[i + 1].path.resolve()), "alpha": a, "hash": hashes.get(n)}
            for i, (n, a) in enumerate(zip(cfg.names, cfg.alpha))
        ],
        "hash": {"per_tensor": cfg.hash, "combined": "sha256 of the lines 'name\\0dtype\\0shape\\0per-tensor digest\\n' "
                 "of every tensor, sorted by name (independent of sharding)"},
    }


def _copy_aux_files(src: Path, dst: Path) -> None:
    skip = {WEIGHTS_INDEX_NAME, CONFIG_NAME, DIAGNOSTICS_JSON, DIAGNOSTICS_PNG}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            shutil.copy2(p, dst / p.name)


def _run(plan: Plan, writer: ShardedWriter | None, diagnose_only: bool,
         thresholds: ThresholdCache | None = None) -> tuple[_Engine, dict[str, str | None]]:
    cfg = plan.cfg
    engine = _Engine(plan, writer, diagnose_only, thresholds)
    reader = _Reader(plan, engine.tasks(), hash="none" if diagnose_only else cfg.hash,
                     io_threads=cfg.io_threads).start()
    total = writer.total_size if writer is not None else sum(
        t.fused_rows * t.row_numel * DTYPES[t.dtype][1] for t in plan.tensors)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="diagnose" if diagnose_only else "fuse", file=sys.stderr, dynamic_ncols=True)
    n_tensors, done = len(plan.tensors), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        while True:
            item = reader.get()
            if item is None:
                break
            task, sid, raws = item
            try:
                if task.stage != "main":
                    engine.run_thr(task, raws)
                else:
                    written = engine.run_main(task, raws)
                    if bar is not None:
                        if diagnose_only:
                            written = (task.r1 - task.r0) * task.tensor.row_numel * DTYPES[task.tensor.dtype][1]
                        bar.update(written)
                        if task.last:
                            done += 1
                            bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            finally:
                reader.release(sid)
    finally:
        torch.set_num_threads(threads)
        reader.close()
        if bar is not None:
            bar.close()
    hashes = ({plan.names[i]: reader.input_hash(i) for i in range(len(plan.inputs))}
              if cfg.hash != "none" and not diagnose_only else {})
    return engine, hashes


class _Terminate(BaseException):
    pass


def fuse(cfg: FuseConfig, thresholds: ThresholdCache | None = None) -> FuseResult:
    """Fuse (or, with ``cfg.diagnose_only``, only diagnose) the specialists. See the module docstring.
    ``thresholds``: TIES thresholds shared by the fuses of a density sweep (see :func:`fuse_densities`)."""
    plan = build_plan(cfg)
    if cfg.diagnose_only:
        engine, _ = _run(plan, None, True)
        diag = _diagnostics(plan, engine)
        if cfg.diagnostics_dir:
            d = Path(cfg.diagnostics_dir)
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / DIAGNOSTICS_JSON, json.dumps(diag, indent=2) + "\n")
            plot_diagnostics(diag, d / DIAGNOSTICS_PNG)
        return FuseResult(None, diag)

    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite: true) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_output(out)  # one fuse per output at a time; a killed one's temporary folders are swept now
    try:
        remove_leftovers(out)
        return _fuse_into(cfg, plan, out, thresholds)
    finally:
        unlock_output(lock)


def _fuse_into(cfg: FuseConfig, plan: Plan, out: Path, thresholds: ThresholdCache | None) -> FuseResult:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, dir_mode())  # the output follows the user's umask, not mkdtemp's 0700
    writer: ShardedWriter | None = None
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):  # SLURM time limit / scancel: clean up, leave nothing behind
            raise _Terminate(f"terminated by signal {signum}")

        old_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        writer = ShardedWriter(tmp, plan.tensors, parse_size(cfg.shard_size), fsync=cfg.fsync)
        engine, hashes = _run(plan, writer, False, thresholds)
        writer.finish()
        owner = plan.inputs[plan.file_owner]
        _copy_aux_files(owner.path, tmp)
        record = _record(plan, hashes)
        if owner.omni is not None:
            data = json.loads(json.dumps(owner.omni))
            data["history"] = list(data.get("history", [])) + [record]
            config = OmniConfig(**data)
            config.save(tmp)
        elif owner.hf_config is not None:
            data = dict(owner.hf_config)
            data["omni_lightning_fusion"] = record
            (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        else:
            (tmp / "fusion.json").write_text(json.dumps(record, indent=2) + "\n")
        diag = _diagnostics(plan, engine)
        diag["record"] = record
        (tmp / DIAGNOSTICS_JSON).write_text(json.dumps(diag, indent=2) + "\n")
        plot_diagnostics(diag, tmp / DIAGNOSTICS_PNG)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return FuseResult(out, diag)


def fuse_densities(cfg: FuseConfig, densities: list[float], outs: list[str | Path]) -> list[FuseResult]:
    """TIES (or DARE + TIES) at several densities, one output each (``outs``), with ``cfg``'s other settings.

    The first fuse's threshold pass computes the thresholds of every density (one read of every input); each fuse
    then reads every input once more to merge and write. k densities: k + 1 reads of the inputs instead of 2k. The
    outputs are bit-identical to fusing each density on its own. A ``fuse --grid`` can do the same by passing one
    :class:`~omni_lightning.fusion.methods.ThresholdCache` to each :func:`fuse` of its settings."""
    if cfg.method not in ("ties", "dare") or (cfg.method == "dare" and cfg.dare.combine != "ties"):
        raise FusionError(f"fuse_densities needs TIES (method ties, or dare with dare.combine ties), not {cfg.method}")
    if len(densities) != len(outs):
        raise FusionError(f"{len(densities)} densities but {len(outs)} outputs")
    cache = ThresholdCache(densities)
    return [fuse(dataclasses.replace(cfg, ties=dataclasses.replace(cfg.ties, density=float(d)), out=str(o)), cache)
            for d, o in zip(densities, outs)]


def run_cli(cfg: FuseConfig) -> int:
    """``omni-lightning fuse``: fuse (or diagnose), print the diagnostics."""
    t0 = time.perf_counter()
    try:
        result = fuse(cfg)
    except _Terminate as e:
        print(f"omni-lightning fuse: {e}; nothing was written", file=sys.stderr)
        return 143
    print(format_diagnostics(result.diagnostics))
    if result.out is not None:
        print(f"wrote fused model {result.out} ({cfg.method}) in {time.perf_counter() - t0:.1f} s; diagnostics in "
              f"{result.out / DIAGNOSTICS_JSON} and {result.out / DIAGNOSTICS_PNG}")
    elif cfg.diagnostics_dir:
        print(f"diagnostics written to {cfg.diagnostics_dir}")
    return 0
