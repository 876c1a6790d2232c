"""The streaming reader: the rows each task of the plan needs, from every input, read (and hashed) ahead of the
merge into reused buffers; and the checks on what was read."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from omni_lightning.fusion.checkpoint import DTYPES, TensorInfo
from omni_lightning.fusion.config import FusionError
from omni_lightning.fusion.plan import Plan, TensorPlan, _Task


class _Reader:
    """Reads the rows each task needs from every input (and hashes them), ahead of the merge, into reused
    buffer sets: memory ≈ SETS × inputs × read_mb."""

    SETS = 3  # buffer sets: one being merged, up to two being read ahead

    def __init__(self, plan: Plan, tasks: Iterator[_Task], hash: str, io_threads: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.plan = plan
        self.tasks = tasks
        self.hash = hash
        self.fds: dict[Path, int] = {}
        self.bufs: list[dict[int, torch.Tensor]] = [{} for _ in range(self.SETS)]
        self.pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="fuse-io")
        self.free: queue.Queue = queue.Queue()
        for i in range(self.SETS):
            self.free.put(i)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.hashers: dict[tuple[int, str], Any] = {}
        self.digests: list[dict[str, tuple[str, str, list[int]]]] = [{} for _ in plan.inputs]
        self.thread = threading.Thread(target=self._run, name="fuse-reader", daemon=True)

    def start(self) -> "_Reader":
        self.thread.start()
        return self

    def _fd(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _read(self, sid: int, i: int, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        item = DTYPES[info.dtype][1] * info.row_numel
        nbytes = (r1 - r0) * item
        buf = self.bufs[sid].get(i)
        if buf is None or buf.numel() < nbytes:
            buf = self.bufs[sid][i] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        view = buf[:nbytes]
        mv = memoryview(view.numpy())
        fd, off, got = self._fd(info.file), info.offset + r0 * item, 0
        while got < nbytes:
            n = os.preadv(fd, [mv[got:]], off + got)
            if n <= 0:
                raise FusionError(f"{info.file}: tensor {info.name}: unexpected end of file (truncated?)")
            got += n
        return view

    def _run(self) -> None:
        try:
            for task in self.tasks:
                while True:
                    if self.stop.is_set():
                        return
                    try:
                        sid = self.free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                # every input of the task in parallel (reads and hashes release the GIL); the next task is
                # submitted only when this one is complete, so each tensor's hash sees its rows in order
                futures = {i: self.pool.submit(self._read_hash, sid, i, task) for i in task.reads
                           if task.r1 <= task.tensor.inputs[i].rows}
                raws = {i: f.result() for i, f in futures.items()}
                self.ready.put((task, sid, raws))
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.ready.put(e)

    def _read_hash(self, sid: int, i: int, task: _Task) -> torch.Tensor:
        info = task.tensor.inputs[i]
        raw = self._read(sid, i, info, task.r0, task.r1)
        if self.hash != "none" and task.stage == "main":
            key = (i, info.name)
            if self.hash == "sha256":
                h = self.hashers.get(key)
                if h is None:
                    h = self.hashers[key] = hashlib.sha256()
                h.update(raw.numpy())
            else:
                self.hashers[key] = zlib.crc32(raw.numpy(), self.hashers.get(key, 0))
            if task.r1 == info.rows:  # the tensor's last rows: its digest is complete
                h = self.hashers.pop(key)
                digest = h.hexdigest() if self.hash == "sha256" else f"{h:08x}"
                self.digests[i][info.name] = (digest, info.dtype, list(info.shape))
        return raw

    def get(self):
        while True:
            try:
                item = self.ready.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the reader thread died") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def release(self, sid: int) -> None:
        self.free.put(sid)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def input_hash(self, i: int) -> str | None:
        """sha256 over (name, dtype, shape, digest of the bytes) of every tensor, by name (independent of sharding);
        the per-tensor digest is a CRC32 or a sha256 (``hash``)."""
        d = self.digests[i]
        for name, info in self.plan.inputs[i].tensors.items():
            if info.nbytes == 0 and name not in d:  # zero-size tensors are never read
                d[name] = (hashlib.sha256(b"").hexdigest() if self.hash == "sha256" else "00000000", info.dtype,
                           list(info.shape))
        if len(d) != len(self.plan.inputs[i].tensors):
            return None
        h = hashlib.sha256()
        for name in sorted(d):
            digest, dtype, shape = d[name]
            h.update(f"{name}\0{dtype}\0{shape}\0{digest}\n".encode())
        return h.hexdigest()


def read_rows(info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of one input tensor, read synchronously (raw bytes, uint8)."""
    item = DTYPES[info.dtype][1] * info.row_numel
    nbytes = (r1 - r0) * item
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    mv = memoryview(buf.numpy())
    fd = os.open(info.file, os.O_RDONLY)
    try:
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [mv[got:]], info.offset + r0 * item + got)
            if n <= 0:
                raise FusionError(f"{info.file}: tensor {info.name}: unexpected end of file (truncated?)")
            got += n
    finally:
        os.close(fd)
    return buf


def _typed(raw: torch.Tensor, info: TensorInfo, rows: int) -> torch.Tensor:
    return raw.view(DTYPES[info.dtype][0]).reshape(rows * info.row_numel)


def _nonfinite(plan: Plan, i: int, t: TensorPlan, raw: torch.Tensor, r0: int, rows: int) -> None:
    """Raise a clear error when ``raw`` (rows r0.. of input i) holds NaN or inf."""
    info = t.inputs[i]
    x = _typed(raw, info, rows)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        e = int(bad.nonzero()[0, 0]) + r0 * info.row_numel
        v = float(x[e - r0 * info.row_numel])
        raise FusionError(f"{info.file}: tensor {t.name} contains {'NaN' if v != v else 'inf'} (flat element {e}) "
                          f"in {plan.names[i]}")
