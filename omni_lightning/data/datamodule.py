"""The one data path of the project: per-modality webdataset streams → batches within a modality.

Every phase uses :class:`OmniDataModule`: a specialist or the recovery phase names one modality, rehearsal
names several with weights. Training streams are infinite (shards resampled, seeded per rank and worker) and
an epoch is exactly ``steps_per_epoch`` batches on every rank, whatever the shard counts, so ranks never
wait on each other and ``len()`` never lies. The modality of global step ``s`` is a function of
``(seed, s)`` only: every rank trains the same modality at the same step (so cross-device negatives are of
one kind) and a resumed run continues the same schedule.

Batches are collated in the DataLoader workers with the model's own processor (:class:`OmniProcessor`);
see :mod:`omni_lightning.modules.base` for the batch layout.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_lightning.data.schema import MODALITIES
from omni_lightning.data.shards import SkipCounter, check_shards, iter_samples, read_index, split_dir


def stable_seed(*parts: Any) -> int:
    """A seed from any values, identical in every process (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


def modality_for_step(seed: int, step: int, modalities: list[str], weights: list[float]) -> str:
    """The modality trained at global step ``step`` — a pure function of ``(seed, step)``."""
    if len(modalities) == 1:
        return modalities[0]
    return random.Random(stable_seed("modality-schedule", seed, step)).choices(modalities, weights=weights)[0]


class Collator:
    """Decoded samples of one modality → model inputs per side (chunked for GradCache when asked)."""

    def __init__(self, model_dir: str, chunk_size: int | None, num_negatives: int) -> None:
        self.model_dir = model_dir
        self.chunk_size = chunk_size
        self.num_negatives = num_negatives
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:  # built lazily, once per worker process
            from omni_lightning.model.processor import OmniProcessor

            self._processor = OmniProcessor.from_pretrained(self.model_dir)
        return self._processor

    def _side(self, items: list[dict], instructions: list[str] | None) -> list[dict[str, torch.Tensor]]:
        n = len(items)
        size = self.chunk_size or n
        out = []
        for i in range(0, n, size):
            instr = None if instructions is None else instructions[i : i + size]
            out.append(self.processor(items[i : i + size], instr))
        return out

    def __call__(self, samples: list[dict[str, Any]], modality: str) -> dict[str, Any]:
        K = self.num_negatives
        negs: list[dict] = []
        if K:
            for s in samples:
                if len(s["negs"]) < K:
                    raise ValueError(
                        f"sample {s['key']} in {s['shard']} has {len(s['negs'])} hard negatives; "
                        f"num_negatives={K} needs at least that many (set data.init_args.num_negatives lower)"
                    )
                negs += s["negs"][:K]
        return {
            "modality": modality,
            "size": len(samples),
            "labels": [s.get("label") for s in samples],
            "num_negatives": K,
            "query": self._side([s["query"] for s in samples], [s["instruction"] for s in samples]),
            "pos": self._side([s["pos"] for s in samples], None),
            "neg": self._side(negs, None) if K else None,
        }


class TrainStream(IterableDataset):
    """Exactly ``steps`` batches per rank per epoch; batch ``s`` of the epoch comes from worker ``s % W``."""

    def __init__(self, dirs: dict[str, str], weights: dict[str, float], collator: Collator, batch_size: int,
                 steps: int, seed: int, shuffle_buffer: int) -> None:
        super().__init__()
        self.dirs, self.weights, self.collator = dirs, weights, collator
        self.batch_size, self.steps, self.seed, self.shuffle_buffer = batch_size, steps, seed, shuffle_buffer
        self.start_step = 0  # global step of this epoch's first batch (set by the datamodule)
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        mods = list(self.dirs)
        weights = [self.weights[m] for m in mods]
        streams: dict[str, Iterator] = {}
        for local in range(wid, self.steps, nworkers):
            step = self.start_step + local
            m = modality_for_step(self.seed, step, mods, weights)
            if m not in streams:
                pipe = iter_samples(self.dirs[m], resampled=True, shuffle_buffer=self.shuffle_buffer,
                                    seed=stable_seed(self.seed, m, self.start_step), handler_skips=self.skips)
                streams[m] = iter(pipe)
            samples = [next(streams[m]) for _ in range(self.batch_size)]
            batch = self.collator(samples, m)
            batch["skipped"] = self.skips.count
            yield batch


class EvalStream(IterableDataset):
    """One finite pass over every modality's eval shards, the same number of batches on every rank.

    Batch ``b`` of a modality goes to rank ``b % world_size``; only complete rounds (one batch per rank) are
    kept, so no rank waits in a collective for a batch another rank never gets. ``max_batches`` bounds the
    batches per rank and modality. A trailing partial batch is dropped.
    """

    def __init__(self, dirs: dict[str, str], collator: Collator, batch_size: int, max_batches: int | None) -> None:
        super().__init__()
        self.dirs, self.collator, self.batch_size, self.max_batches = dirs, collator, batch_size, max_batches
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        for m, d in self.dirs.items():
            total = int(read_index(d)["num_samples"]) // self.batch_size  # upper bound (skips may lower it)
            rounds = total // world
            if self.max_batches is not None:
                rounds = min(rounds, self.max_batches)
            if rounds == 0:
                raise ValueError(
                    f"{d} has {total} eval batches of {self.batch_size}, fewer than the {world} ranks; "
                    "lower the batch size or add eval samples"
                )
            buf: list[dict] = []
            b = 0
            for sample in iter_samples(d, resampled=False, handler_skips=self.skips, split_nodes=False,
                                       split_workers=False):
                buf.append(sample)
                if len(buf) < self.batch_size:
                    continue
                if b % world == rank and (b // world) % nworkers == wid:
                    yield self.collator(buf, m)
                b, buf = b + 1, []
                if b >= rounds * world:
                    break


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class OmniDataModule(LightningDataModule):
    """Per-modality shard streams for every phase.

    Args:
        data_root: dataset root holding ``<modality>/<split>/`` shard sets (``make-demo-data`` writes one).
        modalities: the modalities to train on (one for a specialist or recovery; several for rehearsal).
        weights: sampling weight per modality (default: equal). Only their ratios matter.
        model: the model directory whose processor builds the inputs (linked from the module by the CLI).
        batch_size: pairs per batch (per rank); every batch holds one modality.
        steps_per_epoch: training batches per rank per epoch (exact).
        val_batches: at most this many validation batches per modality (``None``: the whole eval split).
        num_negatives: hard negatives per query taken from each sample's ``negs`` (0: in-batch only).
        chunk_size: split each side into chunks of this size (GradCache; linked from the module).
        num_workers: DataLoader workers decoding and collating in parallel.
        shuffle_buffer: samples held in the shuffle buffer of each stream.
        train_split, val_split: split names under each modality folder.
        seed: seeds the modality schedule and the streams.
    """

    def __init__(
        self,
        data_root: str,
        modalities: list[str],
        weights: dict[str, float] | None = None,
        model: str = "",
        batch_size: int = 32,
        steps_per_epoch: int = 100,
        val_batches: int | None = 4,
        num_negatives: int = 0,
        chunk_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        train_split: str = "train",
        val_split: str = "eval",
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [m for m in modalities if m not in MODALITIES]
        if not modalities or unknown:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}; got {modalities}")
        weights = dict(weights or {m: 1.0 for m in modalities})
        if set(weights) != set(modalities):
            raise ValueError(f"weights {sorted(weights)} must name exactly the modalities {sorted(modalities)}")
        bad = {m: w for m, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"modality weights must be > 0; got {bad} (drop a modality from `modalities` instead)")
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError("batch_size and steps_per_epoch must be >= 1")
        self.data_root = data_root
        self.modalities = list(modalities)
        self.weights = weights
        self.model_dir = model
        self.batch_size, self.steps_per_epoch, self.val_batches = batch_size, steps_per_epoch, val_batches
        self.num_negatives, self.chunk_size, self.num_workers = num_negatives, chunk_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.train_split, self.val_split = train_split, val_split
        self._train: TrainStream | None = None

    def _dirs(self, split: str) -> dict[str, str]:
        dirs = {}
        for m in self.modalities:
            d = split_dir(self.data_root, m, split)
            read_index(d)  # clear error naming the missing folder / index / shard
            dirs[m] = str(d)
        return dirs

    def setup(self, stage: str) -> None:
        if not self.model_dir:
            raise ValueError("OmniDataModule needs the model directory (data.init_args.model) to build inputs")
        collator = Collator(self.model_dir, self.chunk_size, self.num_negatives)
        if stage == "fit":
            train_dirs = self._dirs(self.train_split)
            for d in train_dirs.values():
                check_shards(d, n=1)  # a wrong schema is an error now, not at step 900
            self._train = TrainStream(train_dirs, self.weights, collator, self.batch_size, self.steps_per_epoch,
                                      self.seed, self.shuffle_buffer)
        if stage in ("fit", "validate", "test"):
            val_dirs = self._dirs(self.val_split)
            for d in val_dirs.values():
                check_shards(d, n=1)
            self._val = EvalStream(val_dirs, collator, self.batch_size, self.val_batches)

    def _loader(self, ds: IterableDataset) -> DataLoader:
        return _StepAwareLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)

    def _global_step(self) -> int:
        trainer = self.trainer
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None
        loader = self._loader(self._train)
        # each epoch starts at the current global step: the schedule continues across epochs and resumes
        loader.before_iter = lambda ds: setattr(ds, "start_step", self._global_step())
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._val)


def _identity(x: Any) -> Any:
    return x


class _StepAwareLoader(DataLoader):
    """A DataLoader that lets its dataset learn the global step right before workers copy it."""

    before_iter = None

    def __iter__(self):
        if self.before_iter is not None:
            self.before_iter(self.dataset)
        return super().__iter__()


__all__ = ["Collator", "EvalStream", "OmniDataModule", "TrainStream", "modality_for_step", "stable_seed"]
