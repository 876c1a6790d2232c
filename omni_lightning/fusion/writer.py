"""Writing the output: pre-planned safetensors shards filled by a writer thread."""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from omni_lightning.fusion.checkpoint import DTYPES
from omni_lightning.fusion.plan import TensorPlan
from omni_lightning.model.omni import WEIGHTS_INDEX_NAME, WEIGHTS_NAME


class ShardedWriter:
    """Writes planned tensors into safetensors shards whose headers are known in advance, chunk by chunk.

    The caller (one thread) announces each tensor with :meth:`begin`, hands its bytes in order to :meth:`write`
    and closes it with :meth:`end`; the file work (writes, early writeback, fsync at the end of each shard) runs
    on a background thread, in order, overlapping the merge."""

    WRITEBACK_BYTES = 64 << 20  # start disk writeback of every this many bytes written (with fsync on)
    QUEUE = 8  # chunks in flight

    def __init__(self, directory: Path, tensors: list[TensorPlan], shard_size: int, fsync: bool = True) -> None:
        self.directory, self.fsync = directory, fsync
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        # within a shard: widest dtypes first, so every tensor's data starts aligned to its element size
        self.shards = [sorted(s, key=lambda t: (-DTYPES[t.dtype][1], t.name)) for s in shards]
        n = len(self.shards)
        self.filenames = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [t for s in self.shards for t in s]
        self.total_size = sum(t.nbytes for t in tensors)
        self._shard = -1
        self._remaining: dict[str, int] = {}
        self._opened = False
        # background file thread
        self._q: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._file_loop, name="fuse-writer", daemon=True)
        self._thread.start()
        self._file = None

    # ---------------------------------------------------------------- background thread
    def _file_loop(self) -> None:
        try:
            while True:
                cmd = self._q.get()
                if cmd is None or self._stop.is_set():
                    return
                kind, arg = cmd
                if kind == "open":
                    path, head = arg
                    self._file = open(path, "wb", buffering=0)
                    self._offset = self._flushed = 0
                    self._put(head)
                elif kind == "data":
                    self._put(arg.view(torch.uint8).reshape(-1).numpy())
                    if self.fsync and self._offset - self._flushed >= self.WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                        # start writing this range to disk now (asynchronously) so the fsync at the end of the
                        # shard has little left, and our output does not push the inputs out of the page cache
                        os.posix_fadvise(self._file.fileno(), self._flushed, self._offset - self._flushed,
                                         os.POSIX_FADV_DONTNEED)
                        self._flushed = self._offset
                elif kind == "close":
                    if self.fsync:
                        os.fsync(self._file.fileno())
                    self._file.close()
                    self._file = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
            self._error = e
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _put(self, buf) -> None:
        mv = memoryview(buf).cast("B")
        while mv:
            n = self._file.write(mv)
            mv = mv[n:]
            self._offset += n

    def _send(self, cmd) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise RuntimeError("the writer thread stopped")
            try:
                self._q.put(cmd, timeout=0.2)
                return
            except queue.Full:
                continue

    # ---------------------------------------------------------------- caller's side
    def _open_next(self) -> None:
        if self._opened:
            self._send(("close", None))
        self._shard += 1
        self._opened = True
        tensors = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._send(("open", (self.directory / self.filenames[self._shard], struct.pack("<Q", len(raw)) + raw)))
        self._remaining = {t.name: t.nbytes for t in tensors}
        self._current = iter(tensors)

    def begin(self, t: TensorPlan) -> None:
        if not self._opened or not self._remaining:
            self._open_next()
        expected = next(self._current)
        if expected.name != t.name:  # pragma: no cover - a programming error
            raise RuntimeError(f"writer expected {expected.name}, got {t.name}")
        self._name = t.name

    def write(self, data: torch.Tensor, owned: bool = False) -> int:
        """Queue the next bytes of the current tensor. ``owned``: the caller will not touch ``data`` again
        (otherwise it is copied first, as the caller's buffers are reused)."""
        n = data.numel() * data.element_size()
        left = self._remaining[self._name] - n
        if left < 0:  # pragma: no cover
            raise RuntimeError(f"too many bytes for {self._name}")
        data = data.contiguous()
        if not owned:
            data = data.clone()
        self._send(("data", data))
        self._remaining[self._name] = left
        return n

    def end(self) -> None:
        left = self._remaining.pop(self._name)
        if left:  # pragma: no cover
            raise RuntimeError(f"{self._name}: {left} bytes missing")

    def finish(self) -> None:
        if not self.order:  # no tensor at all: still a valid (empty) file
            self._open_next()
        if self._shard != len(self.shards) - 1 or self._remaining:  # pragma: no cover - a programming error
            raise RuntimeError("the writer did not receive every planned tensor")
        self._send(("close", None))
        self._send(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if len(self.filenames) > 1:
            weight_map = {t.name: self.filenames[i] for i, s in enumerate(self.shards) for t in s}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=30)
