"""Writing shard sets: atomic (a temporary folder beside the destination, renamed when complete) and
byte-reproducible (fixed tar metadata, sorted JSON, deterministic PNG/FLAC encoding).

A writer holds an exclusive lock (``ROOT/<modality>/.<split>.lock``, ``flock``) from start to commit/abort, so
two writes to the same output never run at once (the second is refused). Under that lock every temporary
folder of that output (``.<split>.tmp-*``, ``.<split>.old-*``) is left over by a killed write -- the lock dies
with its process -- and is removed before writing. Readers only ever read ``<split>/index.json`` and the shards
it lists, so a leftover is never mistaken for a result. The output follows the user's umask."""


from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from omni_lightning.data.schema import (
    MODALITIES,
    SCHEMA_VERSION,
    SchemaError,
    encode_record,
)
from omni_lightning.data.shards.layout import INDEX_NAME, SHARD_PATTERN, split_dir
from omni_lightning.utils import dir_mode, lock_output, remove_leftovers, unlock_output

log = logging.getLogger(__name__)

# int mtime: a float one makes tarfile add a PAX header to every member
_TAR_KW = dict(user="omni", group="omni", mode=0o444, mtime=0, encoder=False)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


def _discard(open_files: list[Any], tmp: str, lock: list[Any] | None = None) -> None:
    for f in open_files:
        try:
            f.close()
        except Exception:
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    if lock:
        unlock_output(lock)


class ShardSetWriter:
    """Write one shard set ``out_dir/<modality>/<split>`` atomically.

    Use as a context manager: on a clean exit the set is committed (index written, temporary directory
    renamed into place); on an exception it is aborted and nothing appears at the destination::

        with ShardSetWriter(root, "image", "train", max_per_shard=400) as w:
            for sample in samples:
                w.write(sample)          # DITEM-style sample, see schema.encode_record

    A new shard starts after ``max_per_shard`` samples or once a shard exceeds ``max_shard_bytes``.
    An existing destination is refused (``FileExistsError``) unless ``overwrite=True``.
    """

    def __init__(self, out_dir: str | os.PathLike, modality: str, split: str, *, max_per_shard: int = 1000,
                 max_shard_bytes: int = 1 << 30, overwrite: bool = False):
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
            raise ValueError(f"split {split!r} must be a plain directory name such as 'train' or 'eval'")
        if int(max_per_shard) < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        self.modality, self.split = modality, split
        self.max_per_shard, self.max_shard_bytes = int(max_per_shard), int(max_shard_bytes)
        self.overwrite = overwrite
        self.dest = split_dir(out_dir, modality, split)
        if self.dest.exists() and not overwrite:
            raise FileExistsError(f"{self.dest} already exists; pass overwrite=True to replace it")
        parent = self.dest.parent
        self._created_parents = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock_output(parent / split)
        try:
            self.leftovers = remove_leftovers(parent / split)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=parent))
            os.chmod(self.tmp, dir_mode())  # mkdtemp's 0700 would make the renamed set private
        except BaseException:
            unlock_output(self._lock)
            raise
        # a writer dropped without commit/abort still removes its temporary directory and releases the lock
        self._open_files: list[Any] = []
        self._finalizer = weakref.finalize(self, _discard, self._open_files, str(self.tmp), self._lock)
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._file = None
        self._tar: wds.TarWriter | None = None
        self._cur_count = 0
        self._cur_bytes = 0
        self._state = "open"

    # -- internals --
    def _open_next(self) -> None:
        self._close_current()
        name = SHARD_PATTERN % len(self.shards)
        self._file = open(self.tmp / name, "wb")
        self._tar = wds.TarWriter(self._file, **_TAR_KW)
        # plain USTAR headers (webdataset 1.0.2 documents USTAR but leaves tarfile's PAX default in place);
        # our member names are short, so nothing needs PAX, and skipping its checks is measurably faster
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self._open_files[:] = [self._tar, self._file]  # closed in this order by _discard
        self.shards.append({"file": name, "num_samples": 0})
        self._cur_count = self._cur_bytes = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- API --
    def write(self, sample: Mapping[str, Any]) -> str:
        """Validate, encode and write one DITEM-style sample; return its key."""
        if self._state != "open":
            raise RuntimeError(f"writer for {self.dest} is {self._state}")
        if self._tar is None or self._cur_count >= self.max_per_shard or self._cur_bytes >= self.max_shard_bytes:
            self._open_next()
        key = f"{self.num_samples:08d}"
        shard_name = str(self.dest / self.shards[-1]["file"])
        record, members = encode_record(sample, modality=self.modality, shard=shard_name, key=key)
        try:
            json_bytes = _json_bytes(record)
        except (TypeError, ValueError) as exn:
            raise SchemaError(shard_name, key, "meta", f"record is not JSON-serialisable: {exn}",
                              "JSON types only") from exn
        obj = {"__key__": key, "json": json_bytes, **members}
        self._cur_bytes += self._tar.write(obj) + 512 * (len(obj) - 1)
        self._cur_count += 1
        self.shards[-1]["num_samples"] += 1
        self.num_samples += 1
        return key

    def index(self) -> dict[str, Any]:
        return {"modality": self.modality, "split": self.split, "num_samples": self.num_samples,
                "shards": [dict(s) for s in self.shards], "schema_version": SCHEMA_VERSION}

    def commit(self) -> dict[str, Any]:
        """Finish the last shard, write ``index.json`` and move the set into place. Returns the index."""
        if self._state != "open":
            raise RuntimeError(f"writer for {self.dest} is {self._state}")
        try:
            self._close_current()
            if self.shards and self.shards[-1]["num_samples"] == 0:  # a shard opened for a sample that failed
                (self.tmp / self.shards.pop()["file"]).unlink()
            if self.num_samples == 0:
                raise ValueError(f"no samples were written to {self.dest}")
            index = self.index()
            (self.tmp / INDEX_NAME).write_bytes(json.dumps(index, indent=1, sort_keys=True).encode() + b"\n")
            trash = None
            if self.dest.exists():
                if not self.overwrite:
                    raise FileExistsError(f"{self.dest} appeared while writing; pass overwrite=True to replace it")
                trash = Path(tempfile.mkdtemp(prefix=f".{self.split}.old-", dir=self.dest.parent))
                os.rename(self.dest, trash / "old")
            os.rename(self.tmp, self.dest)
            self._finalizer.detach()
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            unlock_output(self._lock)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return dict(index, dir=str(self.dest))

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        try:
            self._close_current()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            unlock_output(self._lock)
            self._finalizer.detach()
            for p in self._created_parents:  # innermost first; only directories this writer created
                try:
                    p.rmdir()
                except OSError:
                    break
            self._state = "aborted"

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shards(samples: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, modality: str, split: str, *,
                 max_per_shard: int = 1000, max_shard_bytes: int = 1 << 30, overwrite: bool = False,
                 progress: bool = False, total: int | None = None, desc: str | None = None) -> dict[str, Any]:
    """Write DITEM-style ``samples`` to ``out_dir/<modality>/<split>`` (atomic). Returns the index (+ ``dir``)."""
    with ShardSetWriter(out_dir, modality, split, max_per_shard=max_per_shard, max_shard_bytes=max_shard_bytes,
                        overwrite=overwrite) as writer:
        it: Iterable = samples
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(samples, total=total, desc=desc or f"{modality}/{split}", unit="sample")
        for sample in it:
            writer.write(sample)
    return dict(writer.index(), dir=str(writer.dest))
