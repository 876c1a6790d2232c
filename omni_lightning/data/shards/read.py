"""Indexing, checking and streaming webdataset shard sets (sample schema: :mod:`omni_lightning.data.schema`).

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
import tarfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import make_seed, pytorch_worker_seed

from omni_lightning.data.schema import (
    MODALITIES,
    SCHEMA_VERSION,
    SchemaError,
    decode_sample,
)
from omni_lightning.data.shards.layout import INDEX_NAME, SHARD_PATTERN

log = logging.getLogger(__name__)


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


def skip_reason(exn: BaseException | str) -> str:
    """A short, countable reason for a skipped sample (the full message is in ``SkipCounter.reasons``)."""
    if isinstance(exn, SchemaError):
        if exn.problem.startswith("non-finite"):
            return "non-finite media"
        if exn.problem.startswith("cannot decode"):
            return "undecodable media"
        if exn.field == "json":
            return "unreadable record"
        return "schema violation"
    if isinstance(exn, BaseException):
        return f"unreadable shard data ({type(exn).__name__})"
    return "other"


class SkipCounter:
    """Counts samples skipped while reading (corrupt tar members, schema errors, undecodable media).

    Also usable as a webdataset ``handler`` (``handler=counter``): it records the exception and returns True
    (continue). ``count`` is the number of skips, ``reasons`` the last ``max_reasons`` messages and
    ``per_shard`` the count per shard. A warning is logged once per shard (further skips in that shard are only
    counted). The counter is local to the process that iterates: with DataLoader workers every worker holds its
    own copy (it is pickled into the worker), so aggregate across workers/ranks if a global number is needed.
    ``per_reason`` counts skips by :func:`skip_reason`.
    """

    def __init__(self, max_reasons: int = 20):
        self.max_reasons = max_reasons
        self.count = 0
        self.per_shard: dict[str, int] = {}
        self.per_reason: dict[str, int] = {}
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
            reason = skip_reason(exn)
            self.per_reason[reason] = self.per_reason.get(reason, 0) + 1
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
            self.per_reason.clear()
            self._reasons.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "per_shard": dict(self.per_shard), "per_reason": dict(self.per_reason),
                "reasons": self.reasons}

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
