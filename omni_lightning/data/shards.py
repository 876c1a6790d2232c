"""Writing, indexing, checking and streaming webdataset shard sets (sample schema: :mod:`.schema`).

On-disk layout (one shard set per modality and split)::

    ROOT/<modality>/<split>/shard-000000.tar
    ROOT/<modality>/<split>/shard-000001.tar
    ...
    ROOT/<modality>/<split>/index.json
        {"modality": "image", "split": "train", "num_samples": 1200, "schema_version": 1,
         "shards": [{"file": "shard-000000.tar", "num_samples": 400}, ...]}

Writing is atomic: shards are written into a temporary directory beside the destination
(``ROOT/<modality>/.<split>.tmp-XXXX``) which is renamed into place only after the last shard and the index
are complete, so an interrupted write leaves nothing at the destination. Shards are byte-reproducible: the
same samples give the same bytes (fixed tar mtime/owner, sorted JSON, deterministic PNG/FLAC encoding).

Reading (:func:`iter_samples`) is a webdataset pipeline built from the same stages ``wds.WebDataset``
composes -- shard list → ``split_by_node`` → ``split_by_worker`` → open → ``tar_file_expander`` →
``group_by_keys`` (all with the skip-counting handler) -- then an
optional seeded shuffle buffer and :func:`~.schema.decode_sample`. It is assembled stage by stage rather than
through ``wds.WebDataset(resampled=True)`` because the latter seeds its shard sampler from pid, time and
``os.urandom``; here resampling is deterministic per (seed, rank, worker, epoch) -- or per (seed,
``worker_key``, epoch) when the caller names the stream itself (the balanced sampler does). Corrupt or invalid
samples are skipped and counted in a :class:`SkipCounter`; :func:`check_shards` validates the first samples of
every shard at start-up so that a wrong schema is a clear error before training begins.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import make_seed, pytorch_worker_seed

from .schema import (
    MEDIA_EXTENSIONS,
    MODALITIES,
    RECORD_KEYS,
    SCHEMA_VERSION,
    SchemaError,
    _decode_audio,
    _decode_image,
    _decode_video,
    decode_sample,
    encode_record,
)

__all__ = [
    "INDEX_NAME",
    "SHARD_PATTERN",
    "ManifestError",
    "ShardSetWriter",
    "SkipCounter",
    "ShardPipeline",
    "split_dir",
    "write_shards",
    "read_index",
    "shard_urls",
    "iter_samples",
    "check_shards",
    "shard_manifest",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
# int mtime: a float one makes tarfile add a PAX header to every member
_TAR_KW = dict(user="omni", group="omni", mode=0o444, mtime=0, encoder=False)


def split_dir(root: str | os.PathLike, modality: str, split: str) -> Path:
    """``ROOT/<modality>/<split>``."""
    return Path(root) / modality / split


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


def _discard(open_files: list[Any], tmp: str) -> None:
    for f in open_files:
        try:
            f.close()
        except Exception:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


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
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=parent))
        # a writer dropped without commit/abort still removes its temporary directory
        self._open_files: list[Any] = []
        self._finalizer = weakref.finalize(self, _discard, self._open_files, str(self.tmp))
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


# ----------------------------------------------------------------------------------------------------------
# index / urls
# ----------------------------------------------------------------------------------------------------------


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<dir>/index.json``; return it plus ``dir`` and ``urls`` (absolute shard paths).

    Raises ``FileNotFoundError`` naming the missing directory / index / listed shard, and ``ValueError`` for a
    malformed index.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory {d} does not exist (expected ROOT/<modality>/<split> with "
                                f"{INDEX_NAME} and {SHARD_PATTERN % 0}, ...; make-demo-data or shard writes one)")
    path = d / INDEX_NAME
    if not path.is_file():
        tars = sorted(p.name for p in d.glob("*.tar"))
        raise FileNotFoundError(f"shard index {path} does not exist (directory holds {len(tars)} .tar files); "
                                "shard sets are written with their index by write_shards / shard_manifest")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"shard index {path} is not valid JSON: {exn}") from exn
    required = {"modality": str, "split": str, "num_samples": int, "shards": list, "schema_version": int}
    if not isinstance(index, dict):
        raise ValueError(f"shard index {path} must be a JSON object with keys {sorted(required)}")
    for k, t in required.items():
        if not isinstance(index.get(k), t):
            raise ValueError(f"shard index {path}: key {k!r} is {index.get(k)!r}; expected a {t.__name__}")
    if index["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"shard index {path}: schema_version {index['schema_version']} is not supported "
                         f"(this code reads version {SCHEMA_VERSION})")
    if index["modality"] not in MODALITIES:
        raise ValueError(f"shard index {path}: unknown modality {index['modality']!r}; expected one of {MODALITIES}")
    if not index["shards"]:
        raise ValueError(f"shard index {path} lists no shards")
    urls, total = [], 0
    for i, s in enumerate(index["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_samples"), int)):
            raise ValueError(f"shard index {path}: shards[{i}] is {s!r}; expected {{'file': str, 'num_samples': int}}")
        shard = d / s["file"]
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {path} (shards[{i}]) does not exist")
        urls.append(str(shard.resolve()))
        total += s["num_samples"]
    if total != index["num_samples"]:
        raise ValueError(f"shard index {path}: num_samples {index['num_samples']} != sum over shards {total}")
    return dict(index, dir=str(d.resolve()), urls=urls)


def shard_urls(urls_or_dir: str | os.PathLike | Sequence[str]) -> list[str]:
    """A shard-set directory (with index), a single shard / brace pattern (``a-{000..009}.tar``, ``::``-joined
    lists allowed), or a list of those → list of shard URLs."""
    if isinstance(urls_or_dir, (str, os.PathLike)):
        s = os.fspath(urls_or_dir)
        if os.path.isdir(s):
            return read_index(s)["urls"]
        urls = wds.shardlists.expand_urls(s)
    else:
        urls = []
        for u in urls_or_dir:
            urls.extend(shard_urls(u) if os.path.isdir(os.fspath(u)) else wds.shardlists.expand_urls(os.fspath(u)))
    if not urls:
        raise ValueError(f"no shards found in {urls_or_dir!r}")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u):
            raise FileNotFoundError(f"shard {u} does not exist")
    return list(urls)


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


def _shard_of(exn: BaseException) -> str:
    for a in reversed(getattr(exn, "args", ()) or ()):
        if isinstance(a, str) and (a.endswith(".tar") or a.endswith(".tgz") or "://" in a):
            return a
    return getattr(exn, "shard", None) or "<unknown shard>"


class SkipCounter:
    """Counts samples skipped while reading (corrupt tar members, schema errors, undecodable media).

    Also usable as a webdataset ``handler`` (``handler=counter``): it records the exception and returns True
    (continue). ``count`` is the number of skips, ``reasons`` the last ``max_reasons`` messages and
    ``per_shard`` the count per shard. A warning is logged once per shard (further skips in that shard are only
    counted). The counter is local to the process that iterates: with DataLoader workers every worker holds its
    own copy (it is pickled into the worker), so aggregate across workers/ranks if a global number is needed.
    """

    def __init__(self, max_reasons: int = 20):
        self.max_reasons = max_reasons
        self.count = 0
        self.per_shard: dict[str, int] = {}
        self._reasons: deque[str] = deque(maxlen=max_reasons)
        self._lock = threading.Lock()

    @property
    def reasons(self) -> list[str]:
        return list(self._reasons)

    def record(self, exn: BaseException | str, shard: str | None = None) -> None:
        if isinstance(exn, SchemaError):
            shard, msg = shard or exn.shard, str(exn)
        elif isinstance(exn, BaseException):
            shard, msg = shard or _shard_of(exn), f"{type(exn).__name__}: {exn}"
        else:
            shard, msg = shard or "<unknown shard>", str(exn)
        with self._lock:
            self.count += 1
            first = shard not in self.per_shard
            self.per_shard[shard] = self.per_shard.get(shard, 0) + 1
            self._reasons.append(msg)
        if first:
            log.warning("skipping a corrupt/invalid sample in shard %s: %s (further skips in this shard are "
                        "counted, not logged)", shard, msg)

    def __call__(self, exn: BaseException) -> bool:  # webdataset handler protocol
        self.record(exn)
        return True

    def reset(self) -> None:
        with self._lock:
            self.count = 0
            self.per_shard.clear()
            self._reasons.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "per_shard": dict(self.per_shard), "reasons": self.reasons}

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SkipCounter(count={self.count}, shards={len(self.per_shard)})"


class ShardPipeline(wds.DataPipeline, wds.FluidInterface):
    """The pipeline :func:`iter_samples` returns: a ``wds.DataPipeline`` with the fluid interface
    (``.with_epoch``, ``.batched``, ``.map``, ...) and the :class:`SkipCounter` as ``.skips``."""

    skips: SkipCounter
    urls: list[str]
    decoder: "_Decode"


class _ShardList(IterableDataset):
    """Finite shard list, optionally shuffled with the same seeded order on every rank and worker (so that
    ``split_by_node``/``split_by_worker`` partition it consistently); the order changes per epoch."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int):
        super().__init__()
        self.urls, self.shuffle, self.seed, self.epoch = list(urls), shuffle, seed, -1

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        urls = list(self.urls)
        if self.shuffle:
            random.Random(make_seed(self.seed, self.epoch)).shuffle(urls)
        for u in urls:
            yield {"url": u}


class _Shuffle:
    """Sample shuffle buffer seeded from (seed, rank/worker, epoch) at iteration time; ``worker_key`` (when
    not None) replaces the rank/worker part so the caller decides which process reads which stream."""

    def __init__(self, bufsize: int, seed: int, worker_key: int | None = None):
        self.bufsize, self.seed, self.epoch, self.worker_key = bufsize, seed, -1, worker_key

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        self.epoch += 1
        key = pytorch_worker_seed() if self.worker_key is None else self.worker_key
        rng = random.Random(make_seed(self.seed, key, self.epoch))
        buf: list[Any] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(self.bufsize)
            yield buf[i]
            buf[i] = sample
        rng.shuffle(buf)
        yield from buf


def _open_shards(src: Iterable[dict[str, Any]], handler: SkipCounter) -> Iterator[dict[str, Any]]:
    """Like ``webdataset.url_opener`` but closes each shard's stream once it has been read (webdataset leaves
    that to the garbage collector)."""
    for sample in src:
        url = sample["url"]
        try:
            stream = wds.gopen(url, "rb")
        except Exception as exn:  # missing/unreadable shard: count it and go on
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        try:
            yield dict(sample, stream=stream)
        finally:
            stream.close()


class _Skip:
    """Drop the first ``n`` raw samples (fast-forward a seeded stream to a known position without decoding)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        it = iter(src)
        for _ in range(self.n):
            if next(it, _END) is _END:
                return
        yield from it


_END = object()


class _Decode:
    """Decode raw samples; invalid ones are skipped and counted. ``raw_in`` counts the raw samples that reached
    this stage (its input position) and ``failed`` the ones that did not decode, so a stream's position after
    ``k`` decoded samples is ``k + failed``."""

    def __init__(self, skips: SkipCounter, max_consecutive: int):
        self.skips, self.max_consecutive = skips, max_consecutive
        self.raw_in = 0
        self.failed = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        bad = 0
        for raw in src:
            self.raw_in += 1
            shard = raw.get("__url__", "<unknown shard>")
            try:
                sample = decode_sample(raw, shard)
            except SchemaError as exn:
                self.skips.record(exn, shard)
                self.failed += 1
                bad += 1
                if self.max_consecutive and bad >= self.max_consecutive:
                    raise SchemaError(shard, raw.get("__key__"), "*",
                                      f"{bad} consecutive samples were invalid and skipped (last: {exn})",
                                      "valid shards; run check_shards() on the shard directory") from exn
                continue
            bad = 0
            yield sample


def iter_samples(urls_or_dir: str | os.PathLike | Sequence[str], *, resampled: bool = False,
                 shuffle_buffer: int = 0, seed: int = 0, handler_skips: SkipCounter | None = None,
                 shardshuffle: bool = False, max_consecutive_skips: int = 1000, split_nodes: bool = True,
                 split_workers: bool = True, worker_key: int | None = None, skip: int = 0) -> ShardPipeline:
    """Stream decoded samples (see :func:`~.schema.decode_sample`) from a shard set.

    * ``urls_or_dir``: a shard-set directory (``index.json`` is read), a shard path / brace pattern, or a list.
    * ``resampled=False``: one pass over the shards, split across ranks (``split_by_node``) and DataLoader
      workers (``split_by_worker``); ``shardshuffle=True`` shuffles the shard order (same seeded order on
      every rank, new per epoch). ``split_nodes=False`` / ``split_workers=False`` give every rank / worker
      all shards (for callers that partition batches themselves).
    * ``resampled=True``: an infinite stream of shards drawn with replacement,
      seeded from ``(seed, rank*1000 + worker, epoch)`` -- use ``.with_epoch(n)`` to bound an epoch.
    * ``worker_key``: with ``resampled``/``shuffle_buffer``, replaces webdataset's ``rank*1000 + worker`` in
      the seeds, so the stream depends only on ``(seed, worker_key)`` whichever process reads it (the
      balanced sampler keys its streams by step lane, not by worker id).
    * ``shuffle_buffer > 0``: seeded sample shuffle buffer of that size (before decoding).
    * ``skip``: drop the first ``skip`` samples after the shuffle buffer, before decoding: a cheap fast-forward
      to a known position of a seeded stream. ``pipeline.decoder.raw_in`` counts the samples that reached
      decoding after that (valid or not), so the stream's position is ``skip + raw_in``.
    * Corrupt/invalid samples are skipped and counted in ``handler_skips`` (a new :class:`SkipCounter` when
      None; available as ``pipeline.skips``). More than ``max_consecutive_skips`` invalid samples in a row
      raise :class:`SchemaError` (a wrong data set must not spin silently forever); 0 disables the guard.
    """
    urls = shard_urls(urls_or_dir)
    skips = handler_skips if handler_skips is not None else SkipCounter()
    stages: list[Any] = []
    if resampled:
        worker_seed = None if worker_key is None else functools.partial(_constant, int(worker_key))
        stages.append(wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=worker_seed))
    else:
        stages.append(_ShardList(urls, shardshuffle, seed))
        # split_nodes/split_workers=False: every rank / worker reads every shard (the caller partitions)
        stages += ([wds.split_by_node] if split_nodes else []) + ([wds.split_by_worker] if split_workers else [])
    stages.append(functools.partial(_open_shards, handler=skips))
    stages.append(functools.partial(wds.tariterators.tar_file_expander, handler=skips))
    stages.append(functools.partial(wds.tariterators.group_by_keys, handler=skips))
    if shuffle_buffer and shuffle_buffer > 1:
        stages.append(_Shuffle(int(shuffle_buffer), seed, worker_key))
    if skip:
        stages.append(_Skip(skip))
    decoder = _Decode(skips, max_consecutive_skips)
    stages.append(decoder)
    pipe = ShardPipeline(*stages)
    pipe.skips = skips
    pipe.urls = urls
    pipe.decoder = decoder
    return pipe


def _constant(value: int) -> int:
    return value


# ----------------------------------------------------------------------------------------------------------
# start-up check
# ----------------------------------------------------------------------------------------------------------


def _first_raw_samples(shard: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of a tar shard, grouped like webdataset does (key = name up to the first dot)."""
    samples: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    try:
        with tarfile.open(shard, "r|*") as tf:
            for ti in tf:
                if not ti.isreg():
                    continue
                dirname, base = os.path.split(ti.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(dirname, stem) if dirname else stem
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        samples.append(cur)
                        if len(samples) >= n:
                            return samples
                    cur = {"__key__": key, "__url__": shard}
                f = tf.extractfile(ti)
                cur[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exn:
        key = cur["__key__"] if cur else None
        raise SchemaError(shard, key, "tar", f"cannot read the shard: {type(exn).__name__}: {exn}",
                          "a readable (uncompressed or gz) tar file") from exn
    if cur is not None:
        samples.append(cur)
    return samples[:n]


def check_shards(urls_or_dir: str | os.PathLike | Sequence[str], n: int = 1, *,
                 modality: str | None = None) -> dict[str, Any]:
    """Open the first ``n`` samples of every shard, validate and decode them; raise :class:`SchemaError` naming
    the shard and key at fault. With a shard-set directory the index is checked too, and every record's
    ``modality`` must match the index (or ``modality`` when given). Returns ``{"shards", "samples_checked",
    "modality"}``. Meant for datamodule start-up: a wrong schema fails here, not at step 900.
    """
    expected = modality
    if isinstance(urls_or_dir, (str, os.PathLike)) and os.path.isdir(os.fspath(urls_or_dir)):
        index = read_index(urls_or_dir)
        if expected is not None and index["modality"] != expected:
            raise SchemaError(index["dir"], None, "index.modality",
                              f"index says {index['modality']!r} but {expected!r} was requested", repr(expected))
        expected = index["modality"]
        urls = index["urls"]
    else:
        urls = shard_urls(urls_or_dir)
    checked = 0
    for url in urls:
        raws = _first_raw_samples(url, max(1, int(n)))
        if not raws:
            raise SchemaError(url, None, "tar", "shard holds no samples", "at least one sample per shard")
        for raw in raws:
            sample = decode_sample(raw, url)
            if expected is not None and sample["modality"] != expected:
                raise SchemaError(url, raw["__key__"], "modality",
                                  f"record has modality {sample['modality']!r} in a {expected!r} shard set",
                                  repr(expected))
            checked += 1
    return {"shards": len(urls), "samples_checked": checked, "modality": expected}


# ----------------------------------------------------------------------------------------------------------
# manifest → shards
# ----------------------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """A manifest line is malformed or references a missing/unreadable file. Names the file and line."""

    def __init__(self, manifest: Any, line: int, problem: str):
        self.manifest, self.line, self.problem = str(manifest), line, problem
        super().__init__(f"{self.manifest}, line {line}: {problem}")

    def __reduce__(self):
        return (ManifestError, (self.manifest, self.line, self.problem))


_FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _load_media(item: Mapping[str, Any], base: Path, field: str) -> dict[str, Any]:
    """Manifest media item → DITEM (or pass-through bytes). Raises ValueError with a short message."""
    typ = item["type"]
    rel = item.get("path")
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{field}: a {typ} item needs 'path' (a file relative to the manifest's folder)")
    path = (base / rel)
    if not path.exists():
        raise ValueError(f"{field}: file {rel!r} not found (looked for {path})")
    ext = path.suffix.lower().lstrip(".")
    try:
        if typ in ("image", "document"):
            if path.is_dir():
                raise ValueError("is a directory; expected an image file")
            data = path.read_bytes()
            arr = _decode_image(data)  # verifies the file decodes
            if ext in MEDIA_EXTENSIONS[typ]:
                return {"type": typ, "data": data, "ext": "jpg" if ext == "jpeg" else ext}
            return {"type": typ, "image": arr}
        if typ == "video":
            if path.is_dir():
                frames_files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_EXTS)
                if not frames_files:
                    raise ValueError(f"frame folder holds no images ({'/'.join(_FRAME_EXTS)})")
                frames = [_decode_image(p.read_bytes()) for p in frames_files]
                shapes = {f.shape for f in frames}
                if len(shapes) != 1:
                    raise ValueError(f"frames have different sizes {sorted(shapes)}")
                return {"type": "video", "frames": np.stack(frames)}
            if ext != "npy":
                raise ValueError("a video must be a .npy uint8 [T, H, W, 3] array or a folder of frame images")
            return {"type": "video", "frames": _decode_video(path.read_bytes())}
        if typ == "audio":
            if path.is_dir():
                raise ValueError("is a directory; expected an audio file")
            data = path.read_bytes()
            wav, sr = _decode_audio(data)  # verifies the file decodes
            if ext in MEDIA_EXTENSIONS["audio"]:
                return {"type": "audio", "data": data, "ext": ext}
            return {"type": "audio", "waveform": wav, "sample_rate": sr}
    except ValueError as exn:
        raise ValueError(f"{field}: file {rel!r}: {exn}") from exn
    except Exception as exn:
        raise ValueError(f"{field}: file {rel!r} cannot be read as {typ}: {type(exn).__name__}: {exn}") from exn
    raise ValueError(f"{field}: unknown item type {typ!r}")


def _manifest_item(item: Any, base: Path, field: str) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{field} is a {type(item).__name__}; expected an object with a 'type'")
    typ = item.get("type")
    if typ == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"{field}: a text item needs a string 'text'")
        return {"type": "text", "text": item["text"]}
    if typ not in MEDIA_EXTENSIONS:
        allowed = ("text", *MEDIA_EXTENSIONS)
        raise ValueError(f"{field}: unknown type {typ!r}; expected one of {allowed}")
    return _load_media(item, base, field)


def _manifest_samples(path: Path, modality: str) -> Iterator[dict[str, Any]]:
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ManifestError(path, lineno, f"not valid JSON: {exn}") from None
            try:
                if not isinstance(rec, dict):
                    raise ValueError(f"line is a {type(rec).__name__}; expected a JSON object")
                extra = set(rec) - set(RECORD_KEYS)
                if extra:
                    raise ValueError(f"unknown keys {sorted(extra)}; expected only {RECORD_KEYS}")
                for k in ("query", "pos"):
                    if k not in rec:
                        raise ValueError(f"missing {k!r}")
                if rec.get("modality", modality) != modality:
                    raise ValueError(f"modality {rec['modality']!r} differs from the shard set's {modality!r}")
                negs = rec.get("negs") or []
                if not isinstance(negs, list):
                    raise ValueError("'negs' must be a list")
                sample = {
                    "task": rec.get("task", path.stem),
                    "modality": modality,
                    "instruction": rec.get("instruction", ""),
                    "query": _manifest_item(rec["query"], base, "query"),
                    "pos": _manifest_item(rec["pos"], base, "pos"),
                    "negs": [_manifest_item(n, base, f"negs[{i}]") for i, n in enumerate(negs)],
                }
                if rec.get("label") is not None:
                    sample["label"] = rec["label"]
                if rec.get("meta") is not None:
                    sample["meta"] = rec["meta"]
            except ValueError as exn:
                raise ManifestError(path, lineno, str(exn)) from None
            yield lineno, sample


def shard_manifest(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, modality: str, split: str, *,
                   max_per_shard: int = 1000, max_shard_bytes: int = 1 << 30, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Turn a JSONL manifest into ``out_dir/<modality>/<split>`` shards (atomic; tqdm progress bar).

    One line per pair: ``{"task", "modality", "instruction", "query": ITEM, "pos": ITEM, "negs": [ITEM...],
    "label", "meta"}`` where ``ITEM = {"type": "text", "text": ...}`` or ``{"type": "image"|"document"|"video"|
    "audio", "path": <relative to the manifest's folder>}``: ``.png``/``.jpg`` images (stored as they are;
    other PIL formats re-encoded as PNG), ``.npy`` uint8 ``[T, H, W, 3]`` or a folder of frame images for
    video, ``.wav``/``.flac`` audio (stored as they are; other soundfile formats re-encoded as FLAC).
    ``task`` defaults to the manifest's file stem, ``modality`` to the argument, ``instruction`` to ``""``.
    A malformed line or a missing/unreadable file raises :class:`ManifestError` naming the line; nothing is
    written then. Returns the index (+ ``dir``).
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    with open(path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    if total == 0:
        raise ManifestError(path, 0, "manifest holds no lines")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"shard {modality}/{split}", unit="sample")
    try:
        with ShardSetWriter(out_dir, modality, split, max_per_shard=max_per_shard,
                            max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            for lineno, sample in _manifest_samples(path, modality):
                try:
                    writer.write(sample)
                except SchemaError as exn:
                    raise ManifestError(path, lineno, f"{exn.field}: {exn.problem}"
                                        + (f" (expected {exn.expected})" if exn.expected else "")) from None
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return dict(writer.index(), dir=str(writer.dest))
