"""The one data path of the project: per-modality webdataset streams → batches, as a LightningDataModule.

Every phase uses :class:`OmniDataModule`: a specialist or the recovery phase names one modality, rehearsal
names several with weights. Training batches come from the balanced sampler
(:mod:`omni_lightning.data.balanced_sampler`): infinite resampled streams, exactly ``steps_per_epoch`` batches
on every rank per epoch, the modality of global step ``s`` a function of ``(seed, s)`` only (identical on every
rank and across a stop/resume), an exact mid-epoch resume from a Lightning checkpoint, and the mix actually
trained attached to each batch for logging. This module wires it into Lightning: it builds the streams,
tells the stream where to start right before the DataLoader's workers fork, records what training consumed
(``on_before_batch_transfer``) and saves/restores that position with the checkpoint (``state_dict``).

Batches are collated in the DataLoader workers with the model's own processor (:class:`OmniProcessor`);
see :mod:`omni_lightning.modules.base` for the batch layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_lightning.data.balanced_sampler import (
    BalancedSchedule,
    BalancedStream,
    StreamProgress,
    check_sources,
    check_weights,
    modality_for_step,
    resolve_weights,
    stable_seed,
)
from omni_lightning.data.shards import (
    SkipCounter,
    check_shards,
    iter_samples,
    read_index,
    split_dir,
)
from omni_lightning.modalities import MODALITIES
from omni_lightning.model.processor import OmniProcessor


SKIP_CHECK_MIN_SAMPLES = 200


class TooManySkips(RuntimeError):
    """More than ``max_skip_fraction`` of the training samples were skipped as corrupt or invalid."""


class Collator:
    """Decoded samples of one modality → model inputs per side (chunked for GradCache when asked)."""

    def __init__(self, model_dir: str, chunk_size: int | None, num_negatives: int) -> None:
        self.model_dir = model_dir
        self.chunk_size = chunk_size
        self.num_negatives = num_negatives
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:  # built lazily, once per process
            self._processor = OmniProcessor.from_pretrained(self.model_dir)
        return self._processor

    def __getstate__(self) -> dict[str, Any]:
        # workers started by fork inherit a processor built in the parent; spawned ones rebuild it lazily
        return dict(self.__dict__, _processor=None)

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
            "keys": [s["key"] for s in samples],
            "num_negatives": K,
            "query": self._side([s["query"] for s in samples], [s["instruction"] for s in samples]),
            "pos": self._side([s["pos"] for s in samples], None),
            "neg": self._side(negs, None) if K else None,
        }


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
        weights: sampling weight per modality (default: equal). Only their ratios matter; each must be > 0.
        size_temperature: instead of ``weights``, weight modality ``m`` by corpus size as ``n_m^(1/T)``
            (``n_m`` from its train ``index.json``): 1 = proportional to size, larger = closer to equal.
        mixed_batches: every batch holds all modalities (per-modality sub-batches of sizes ``B·p_m``, loss per
            sub-batch, averaged by size) instead of one modality per batch (the default).
        model: the model directory whose processor builds the inputs (linked from the module by the CLI).
        batch_size: pairs per batch (per rank).
        steps_per_epoch: training batches per rank per epoch (exact).
        val_batches: at most this many validation batches per modality (``None``: the whole eval split).
        num_negatives: hard negatives per query taken from each sample's ``negs`` (0: in-batch only).
        chunk_size: split each side into chunks of this size (GradCache; linked from the module).
        num_workers: DataLoader workers decoding and collating in parallel (an exact resume needs the same
            value as the run that wrote the checkpoint).
        shuffle_buffer: raw samples held for shuffling per DataLoader worker (per rank without workers), split
            across the modality streams by weight (at least 2 each).
        train_split, val_split: split names under each modality folder.
        seed: seeds the modality schedule and the streams.
        max_skip_fraction: training stops (:class:`TooManySkips`, with the counts per reason) once more than this
            share of the samples read was skipped as corrupt or invalid: checked from
            ``SKIP_CHECK_MIN_SAMPLES`` samples on, and at the end of every training epoch whatever the count.
    """

    def __init__(
        self,
        data_root: str,
        modalities: list[str],
        weights: dict[str, float] | None = None,
        size_temperature: float | None = None,
        mixed_batches: bool = False,
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
        max_skip_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1]; got {max_skip_fraction}")
        self.max_skip_fraction = float(max_skip_fraction)
        unknown = [m for m in modalities if m not in MODALITIES]
        if not modalities or unknown:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}; got {modalities}")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities {modalities} name a modality twice")
        self.weights = check_weights(modalities, weights)  # clear errors now; resolved against sizes in setup
        if self.weights is not None and size_temperature is not None:
            raise ValueError("set either data.init_args.weights or data.init_args.size_temperature, not both")
        if size_temperature is not None and not (math.isfinite(size_temperature) and size_temperature > 0):
            raise ValueError(f"size_temperature must be > 0; got {size_temperature} "
                             "(1 = proportional to corpus size, larger = closer to equal weights)")
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError("batch_size and steps_per_epoch must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}")
        self.data_root = data_root
        self.modalities = list(modalities)
        self.size_temperature, self.mixed_batches = size_temperature, mixed_batches
        self.model_dir = model
        self.batch_size, self.steps_per_epoch, self.val_batches = batch_size, steps_per_epoch, val_batches
        self.num_negatives, self.chunk_size, self.num_workers = num_negatives, chunk_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.train_split, self.val_split = train_split, val_split
        self.probs: dict[str, float] | None = None  # sampling probabilities, resolved in setup("fit")
        self._train: BalancedStream | None = None
        self._progress: StreamProgress | None = None
        self._pending_state: dict[str, Any] | None = None

    def _dirs(self, split: str) -> dict[str, str]:
        dirs = {}
        for m in self.modalities:
            d = split_dir(self.data_root, m, split)
            try:
                read_index(d)  # clear error naming the missing folder / index / shard
            except (FileNotFoundError, ValueError) as exn:
                raise type(exn)(f"modality {m!r} ({split}): {exn}. Write its shards (make-demo-data / shard) or "
                                "drop it from data.init_args.modalities") from exn
            dirs[m] = str(d)
        return dirs

    def setup(self, stage: str) -> None:
        if not self.model_dir:
            raise ValueError("OmniDataModule needs the model directory (data.init_args.model) to build inputs")
        collator = Collator(self.model_dir, self.chunk_size, self.num_negatives)
        if self.num_workers > 0:
            # built once here, so the DataLoader workers (forked anew every epoch and every validation)
            # inherit it instead of each loading the processor again
            collator.processor
        if stage == "fit":
            train_dirs = self._dirs(self.train_split)
            indexes = {m: read_index(d) for m, d in train_dirs.items()}
            sizes = {m: int(ix["num_samples"]) for m, ix in indexes.items()}
            world = self.trainer.world_size if self.trainer is not None else _rank_world()[1]
            check_sources(sizes, {m: len(ix["shards"]) for m, ix in indexes.items()}, train_dirs,
                          self.num_workers, world)
            for d in train_dirs.values():
                check_shards(d, n=1)  # a wrong schema is an error now, not at step 900
            self.probs = resolve_weights(self.modalities, self.weights, self.size_temperature, sizes)
            schedule = BalancedSchedule(self.modalities, self.probs, self.batch_size, self.seed, self.mixed_batches)
            self._train = BalancedStream(train_dirs, schedule, collator, self.steps_per_epoch, self.seed,
                                         self.shuffle_buffer)
            self._progress = StreamProgress(schedule, self.steps_per_epoch, self.num_workers)
            if self._pending_state is not None:
                self._progress.load_state_dict(self._pending_state)
                self._pending_state = None
        if stage in ("fit", "validate", "test"):
            val_dirs = self._dirs(self.val_split)
            for d in val_dirs.values():
                check_shards(d, n=1)
            self._val = EvalStream(val_dirs, collator, self.batch_size, self.val_batches)

    @property
    def schedule(self) -> BalancedSchedule | None:
        """The training schedule (which modalities each step holds), once ``setup("fit")`` has run."""
        return None if self._train is None else self._train.schedule

    def _loader(self, ds: IterableDataset) -> DataLoader:
        return _StreamLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None
        loader = self._loader(self._train)
        loader.before_iter = self._begin_train_epoch
        loader.progress = self._progress
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._val)

    # ------------------------------------------------------------------ stream position and mix
    def _begin_train_epoch(self, ds: BalancedStream) -> None:
        """Runs in the main process right before the workers copy the stream: where this iteration starts."""
        assert self._progress is not None
        rank, world = _rank_world()
        trainer_epoch = self.trainer.current_epoch if self.trainer is not None else None
        epoch, offset, extras = self._progress.begin_epoch(trainer_epoch, rank, world)
        ds.set_position(epoch, offset, rank, world, extras)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record each training batch as training takes it (this hook runs right before the step)."""
        if isinstance(batch, dict) and "stream" in batch:
            meta = batch.pop("stream")
            trainer = self.trainer
            if self._progress is not None and (trainer is None or trainer.training):
                self._progress.observe(meta)
                batch["skipped"] = self._progress.skipped
                self.check_skip_fraction(final=False)
                if len(self.modalities) > 1:
                    batch["mix"] = self._progress.mix_fractions()
        return batch

    def check_skip_fraction(self, final: bool = True) -> None:
        """Raise :class:`TooManySkips` when more than ``max_skip_fraction`` of the training samples read so far
        were skipped; ``final=False`` waits for ``SKIP_CHECK_MIN_SAMPLES`` samples (one bad sample among the
        first few is no verdict on the data set)."""
        p = self._progress
        if p is None:
            return
        skipped, read = p.skipped, p.skipped + p.trained
        if read == 0 or (not final and read < SKIP_CHECK_MIN_SAMPLES):
            return
        if skipped / read > self.max_skip_fraction:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(p.skip_reasons.items(), key=lambda x: -x[1]))
            raise TooManySkips(
                f"training stopped: {skipped} of {read} samples read ({skipped / read:.1%}) were skipped as corrupt or "
                f"invalid, above data.init_args.max_skip_fraction={self.max_skip_fraction:g} (by reason: {reasons}). "
                f"The data under {self.data_root} needs fixing (each skip is logged with its shard and sample; "
                "check_shards validates a shard set), or raise max_skip_fraction to accept it")

    @property
    def mix(self) -> dict[str, float]:
        """Share of trained samples per modality so far (``{}`` before training)."""
        return self._progress.mix_fractions() if self._progress is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (every rank's part), saved in Lightning checkpoints."""
        if self._progress is None:
            return {}
        extras = [dict(self._progress.extras)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # checkpoints are dumped on every rank together (Trainer.save_checkpoint's contract); only rank 0's
            # copy is written, so it must hold every rank's failed-decode counts
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, extras[0])
            extras = gathered
        limit = None
        if self.trainer is not None and math.isfinite(self.trainer.num_training_batches):
            limit = int(self.trainer.num_training_batches)
        return {"train_stream": self._progress.state_dict(extras, limit)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_stream")
        if not state:
            return
        if self._progress is not None:
            self._progress.load_state_dict(state)
        else:  # restored before setup: applied when the stream is built
            self._pending_state = dict(state)


def _identity(x: Any) -> Any:
    return x


class _StreamLoader(DataLoader):
    """A DataLoader that lets the datamodule position its stream right before workers copy it.

    It is *stateful* for Lightning (``state_dict``/``load_state_dict``) so that a mid-epoch resume is not
    flagged as inexact: the position itself is saved and restored by :meth:`OmniDataModule.state_dict`, which
    Lightning restores in every case (also at epoch boundaries, where it skips loader states).
    """

    before_iter = None
    progress: StreamProgress | None = None

    def __iter__(self):
        if self.before_iter is not None:
            self.before_iter(self.dataset)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        p = self.progress
        return {"restored_by": "OmniDataModule.load_state_dict",
                **({"epoch": p.epoch, "next": p.next} if p is not None else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: the datamodule has restored the position already (see the class docstring)."""


__all__ = ["Collator", "EvalStream", "OmniDataModule", "TooManySkips", "modality_for_step", "stable_seed"]
