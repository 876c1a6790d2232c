"""The balanced multi-modal sampler: per-modality shard streams mixed by a seeded, per-step schedule.

Every training phase reads through it (a specialist or the recovery phase simply names one modality).

**Schedule.** The batch trained at global step ``s`` (``s = epoch * steps_per_epoch + local_step``, counted in
batches) draws its modality from ``(seed, s)`` only (:func:`modality_for_step`), with probabilities from the
modality weights: equal by default, explicit, or temperature-scaled by corpus size (``w_m ∝ n_m^(1/T)``,
``n_m`` = ``num_samples`` of the modality's ``index.json``; :func:`resolve_weights`). Every rank therefore
trains the same modality at the same step (in-batch and cross-device negatives are of one kind) and a
resumed run continues the same schedule. In **mixed-batch** mode a step holds every modality instead: the
batch of ``B`` pairs is split into per-modality sub-batches of sizes ``B·p_m`` rounded by systematic sampling
of the remainders (a function of ``(seed, s)`` too, so sizes agree on every rank and the expected share of
modality ``m`` is exactly ``p_m``); the loss is computed per sub-batch (negatives stay within a modality) and
averaged weighted by sub-batch size (see :mod:`omni_lightning.modules.base`).

**Streams and exact batch counts.** Each (rank, modality, epoch, lane) reads its own infinite stream: the
modality's shards resampled with replacement, a seeded shuffle buffer (the configured buffer is per worker,
split across its modality streams by weight), decoding in the DataLoader worker.
``lane = local_step % num_workers`` is the residue class of the step inside its epoch -- not the worker id --
so the stream a step reads is fixed by the step, whichever worker serves it. An epoch is exactly
``steps_per_epoch`` batches on every rank whatever the shard counts (``len()`` equals what is yielded, ranks
never wait for each other).

**Exact resume.** To continue an epoch at local step ``o`` the workers are re-dealt: worker ``w`` serves lane
``(o + w) % W`` (DataLoader worker ``w`` yields loader batches ``w, w+W, ...``, i.e. local steps ``o+w, ...``)
and each of its modality streams is fast-forwarded by the number of raw samples that lane consumed in steps
``[0, o)``. That number is computed from the schedule (``B`` per step of the lane for that modality) plus, per
(lane, modality), the samples that failed to decode there (a corrupt sample is replaced by the next one and
shifts the stream); those few integers are the only stored state (:class:`StreamProgress`, saved in the
datamodule's checkpoint state and gathered from every rank). The fast-forward drops raw samples after the
shuffle buffer and before decoding, so it costs tar reading only. A run stopped at step ``s`` and resumed with
``--ckpt_path`` therefore sees the same samples in the same order as an uninterrupted run, provided seed,
batch size, steps per epoch, weights, ``num_workers`` and the number of ranks are unchanged (a warning says
otherwise).

**Mix.** What training actually consumed is counted per modality (samples) in the main process and attached to
each training batch as running fractions; the module logs them as ``<phase>/mix/<modality>``.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

from torch.utils.data import IterableDataset, get_worker_info

from omni_lightning.data.shards import SkipCounter, iter_samples

STATE_VERSION = 1


def stable_seed(*parts: Any) -> int:
    """A seed from any values, identical in every process (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


def modality_for_step(seed: int, step: int, modalities: Sequence[str], weights: Sequence[float]) -> str:
    """The modality trained at global step ``step`` -- a pure function of ``(seed, step)``."""
    if len(modalities) == 1:
        return modalities[0]
    return random.Random(stable_seed("modality-schedule", seed, step)).choices(list(modalities), weights=weights)[0]


# ------------------------------------------------------------------------------------------------ weights


def temperature_weights(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """``p_m ∝ n_m^(1/T)`` normalised (computed in log space: no overflow for small ``T``). ``T = 1`` samples
    in proportion to corpus size, large ``T`` tends to equal weights, ``T < 1`` favours the larger corpora."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"size_temperature must be a finite number > 0; got {temperature!r} "
                         "(1 = proportional to corpus size, larger = closer to equal weights)")
    logs = {}
    for m, n in sizes.items():
        if n <= 0:
            raise ValueError(f"modality {m!r} has {n} training samples; temperature weights need every corpus "
                             "non-empty (drop the modality or write its shards)")
        logs[m] = math.log(n) / temperature
    top = max(logs.values())
    raw = {m: math.exp(v - top) for m, v in logs.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def check_weights(modalities: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate explicit weights (names, > 0, finite); ``None`` stays ``None`` (equal weights)."""
    if weights is None:
        return None
    weights = dict(weights)
    missing, unknown = [m for m in modalities if m not in weights], [m for m in weights if m not in modalities]
    if missing or unknown:
        raise ValueError(f"data weights must name exactly the modalities {list(modalities)}: "
                         + (f"missing {missing} " if missing else "") + (f"unknown {unknown}" if unknown else "")
                         + " (set data.init_args.weights accordingly, or leave it unset for equal weights)")
    for m, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"weight of modality {m!r} is {w!r}; weights must be finite and > 0 "
                             f"(to leave {m!r} out, drop it from data.init_args.modalities)")
    return {m: float(weights[m]) for m in modalities}


def resolve_weights(modalities: Sequence[str], weights: Mapping[str, float] | None = None,
                    size_temperature: float | None = None,
                    sizes: Mapping[str, int] | None = None) -> dict[str, float]:
    """Sampling probabilities per modality (summing to 1): equal, explicit (normalised) or by corpus size."""
    if weights is not None and size_temperature is not None:
        raise ValueError("set either data weights (explicit) or size_temperature (by corpus size), not both")
    if size_temperature is not None:
        if sizes is None:
            raise ValueError("size_temperature needs the corpus sizes (index.json num_samples)")
        return temperature_weights({m: int(sizes[m]) for m in modalities}, size_temperature)
    checked = check_weights(modalities, weights) or {m: 1.0 for m in modalities}
    total = sum(checked.values())
    return {m: checked[m] / total for m in modalities}


def check_sources(sizes: Mapping[str, int], shards: Mapping[str, int], dirs: Mapping[str, str],
                  num_workers: int, world_size: int) -> None:
    """Errors for empty modalities; a warning when a modality has fewer shards than readers."""
    for m, n in sizes.items():
        if n <= 0:
            raise ValueError(f"modality {m!r} is empty: {dirs[m]} holds {n} samples; write its shards "
                             "(make-demo-data / shard) or drop it from data.init_args.modalities")
    readers = max(1, num_workers) * max(1, world_size)
    for m, k in shards.items():
        if k < readers:
            warnings.warn(
                f"modality {m!r} has {k} shard(s) in {dirs[m]} but {max(1, num_workers)} worker(s) x "
                f"{max(1, world_size)} rank(s) = {readers} streams read it. Training stays exact (streams "
                "resample shards) but streams share shards, so different ranks/workers see the same samples "
                "more often; write more, smaller shards (shard --max_per_shard) or lower data.init_args.num_workers.",
                stacklevel=2,
            )


# ------------------------------------------------------------------------------------------------ schedule


class BalancedSchedule:
    """Which modality (within-modality mode) or how many samples of each (mixed mode) step ``s`` holds."""

    def __init__(self, modalities: Sequence[str], probs: Mapping[str, float], batch_size: int, seed: int,
                 mixed: bool = False) -> None:
        self.modalities = list(modalities)
        self.probs = [float(probs[m]) for m in self.modalities]
        self.batch_size, self.seed, self.mixed = int(batch_size), int(seed), bool(mixed)

    def fingerprint(self) -> dict[str, Any]:
        return {"modalities": self.modalities, "probs": [round(p, 12) for p in self.probs],
                "batch_size": self.batch_size, "seed": self.seed, "mixed": self.mixed}

    def modality(self, step: int) -> str:
        return modality_for_step(self.seed, step, self.modalities, self.probs)

    def composition(self, step: int) -> dict[str, int]:
        """Samples per modality at step ``step`` (only modalities with a positive count, in config order)."""
        B = self.batch_size
        if not self.mixed or len(self.modalities) == 1:
            return {self.modality(step): B}
        quotas = [B * p for p in self.probs]
        counts = [int(math.floor(q)) for q in quotas]
        left = B - sum(counts)
        if left:
            # systematic sampling of the fractional parts: modality m gets an extra slot with probability
            # exactly frac_m (each frac < 1 and they sum to `left`), so E[count_m] = B * p_m
            fracs = [q - c for q, c in zip(quotas, counts)]
            u = random.Random(stable_seed("mixed-composition", self.seed, step)).random()
            points, acc, i = [u + k for k in range(left)], 0.0, 0
            for j, f in enumerate(fracs):
                acc += f
                while i < len(points) and points[i] < acc:
                    counts[j] += 1
                    i += 1
            counts[max(range(len(fracs)), key=lambda j: fracs[j])] += len(points) - i  # float round-off only
        return {m: n for m, n in zip(self.modalities, counts) if n > 0}

    def sparsest_steps(self) -> list[frozenset[str]]:
        """The smallest sets of modalities one step can hold: each modality alone (one modality per batch), or
        in mixed mode those whose sub-batch is never empty (``floor(B·p_m) >= 1``)."""
        if self.mixed:
            always = frozenset(m for m, p in zip(self.modalities, self.probs) if math.floor(self.batch_size * p) >= 1)
            if always:
                return [always]
        return [frozenset([m]) for m in self.modalities]

    def lane_positions(self, epoch: int, steps_per_epoch: int, lane: int, num_lanes: int,
                       offset: int) -> dict[str, int]:
        """Samples lane ``lane`` consumed per modality in local steps ``[0, offset)`` of ``epoch``."""
        pos = {m: 0 for m in self.modalities}
        for local in range(lane, min(offset, steps_per_epoch), num_lanes):
            for m, n in self.composition(epoch * steps_per_epoch + local).items():
                pos[m] += n
        return pos


# ------------------------------------------------------------------------------------------------ stream


class _LaneStream:
    """One (rank, modality, epoch, lane) stream, fast-forwarded by ``skip`` raw samples."""

    def __init__(self, directory: str, seed: int, shuffle_buffer: int, skip: int, extra: int,
                 skips: SkipCounter, max_consecutive_skips: int) -> None:
        self.pipe = iter_samples(directory, resampled=True, shuffle_buffer=shuffle_buffer, seed=seed, worker_key=0,
                                 skip=skip, handler_skips=skips, max_consecutive_skips=max_consecutive_skips)
        self.it = iter(self.pipe)
        self.extra0 = extra

    def take(self, n: int) -> list[dict[str, Any]]:
        return [next(self.it) for _ in range(n)]

    @property
    def extra(self) -> int:
        """Raw samples consumed beyond the decoded ones since the epoch began (failed decodes)."""
        return self.extra0 + self.pipe.decoder.failed


class BalancedStream(IterableDataset):
    """Exactly ``steps`` batches per rank per epoch, following a :class:`BalancedSchedule`.

    ``collate(samples, modality)`` turns one modality's decoded samples into a (sub-)batch dict. Each yielded
    batch carries ``batch["stream"]``: its position and bookkeeping, consumed by :class:`StreamProgress` in the
    main process (the datamodule removes it before the batch reaches the model). Call :meth:`set_position`
    in the main process before every iteration (the datamodule's loader does, right before workers fork).
    """

    def __init__(self, dirs: Mapping[str, str], schedule: BalancedSchedule, collate: Callable[[list, str], dict],
                 steps: int, seed: int, shuffle_buffer: int, max_consecutive_skips: int = 1000) -> None:
        super().__init__()
        missing = [m for m in schedule.modalities if m not in dirs]
        if missing:
            raise ValueError(f"no shard directory for modalities {missing}")
        self.dirs, self.schedule, self.collate = dict(dirs), schedule, collate
        self.steps, self.seed, self.shuffle_buffer = int(steps), int(seed), int(shuffle_buffer)
        self.max_consecutive_skips = max_consecutive_skips
        self.skips = SkipCounter()
        self.set_position(0, 0)

    def __len__(self) -> int:
        return self.steps

    def set_position(self, epoch: int, offset: int, rank: int = 0, world_size: int = 1,
                     extras: Mapping[str, int] | None = None) -> None:
        """Next iteration yields local steps ``offset .. steps-1`` of ``epoch`` as rank ``rank``; ``extras``
        maps ``"<lane>/<modality>"`` to failed decodes already consumed in this epoch (from a checkpoint)."""
        if not 0 <= offset <= self.steps:
            raise ValueError(f"offset {offset} outside [0, {self.steps}]")
        self.epoch, self.offset, self.rank, self.world_size = int(epoch), int(offset), int(rank), int(world_size)
        self.extras = dict(extras or {})

    def stream_seed(self, modality: str, lane: int) -> int:
        return stable_seed("stream", self.seed, self.rank, modality, self.epoch, lane)

    def stream_buffer(self, modality: str) -> int:
        """Shuffle buffer of one modality's stream: ``shuffle_buffer`` is what a worker holds in all, split by
        weight (at least 2 each), so memory and the samples buffered but never decoded at the end of an epoch
        do not grow with the number of modalities -- as in one plain webdataset pipeline over all shards."""
        if self.shuffle_buffer <= 1:
            return 0
        p = self.schedule.probs[self.schedule.modalities.index(modality)]
        return max(2, round(self.shuffle_buffer * p))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, W = (info.id, info.num_workers) if info else (0, 1)
        self.skips.reset()  # a worker's copy counts its lane; in-process it restarts every epoch
        lane = (self.offset + wid) % W
        start = self.schedule.lane_positions(self.epoch, self.steps, lane, W, self.offset)
        streams: dict[str, _LaneStream] = {}
        for local in range(self.offset + wid, self.steps, W):
            comp = self.schedule.composition(self.epoch * self.steps + local)
            parts = []
            for m, n in comp.items():
                if m not in streams:
                    extra = int(self.extras.get(f"{lane}/{m}", 0))
                    streams[m] = _LaneStream(self.dirs[m], self.stream_seed(m, lane), self.stream_buffer(m),
                                             start[m] + extra, extra, self.skips, self.max_consecutive_skips)
                parts.append(self.collate(streams[m].take(n), m))
            batch = parts[0] if len(parts) == 1 and not self.schedule.mixed else _mixed(parts)
            batch["stream"] = {
                "epoch": self.epoch, "local": local, "lane": lane, "num_lanes": W, "composition": comp,
                "extra": {m: streams[m].extra for m in comp}, "skipped": self.skips.count,
                "skip_reasons": dict(self.skips.per_reason),
            }
            yield batch


def _mixed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-modality sub-batches of one step (mixed-batch mode)."""
    return {
        "modality": "mixed",
        "size": sum(p["size"] for p in parts),
        "parts": parts,
        "labels": [lab for p in parts for lab in p.get("labels", [])],
        "keys": [k for p in parts for k in p.get("keys", [])],
        "num_negatives": parts[0].get("num_negatives", 0),
    }


# ------------------------------------------------------------------------------------------------ progress


class StreamProgress:
    """What training consumed, kept in the main process: the stream position, failed decodes per (lane,
    modality) in the current epoch, the modality mix and the skipped-sample count.

    ``observe`` is called with each trained batch's ``stream`` record; ``begin_epoch`` says where the next
    iteration starts; ``state_dict``/``load_state_dict`` carry the position through a checkpoint.
    """

    def __init__(self, schedule: BalancedSchedule, steps: int, num_lanes: int) -> None:
        self.schedule, self.steps, self.num_lanes = schedule, int(steps), max(1, int(num_lanes))
        self.epoch, self.next = 0, 0
        self.started = False
        self.extras: dict[str, int] = {}
        self.mix = {m: 0 for m in schedule.modalities}
        self._skipped: dict[tuple[int, int], int] = {}
        self._skip_reasons: dict[tuple[int, int], dict[str, int]] = {}
        self._skip_base: dict[str, int] = {}  # skips by reason before the checkpoint this run resumed from
        self._pending: dict[str, Any] | None = None

    # -------------------------------------------------------------- training side
    def observe(self, meta: Mapping[str, Any]) -> None:
        if meta["epoch"] != self.epoch:
            self.extras = {}
        self.epoch, self.next, self.started = int(meta["epoch"]), int(meta["local"]) + 1, True
        for m, n in meta["extra"].items():
            self.extras[f"{meta['lane']}/{m}"] = int(n)
        for m, n in meta["composition"].items():
            self.mix[m] = self.mix.get(m, 0) + int(n)
        self._skipped[(int(meta["epoch"]), int(meta["lane"]))] = int(meta["skipped"])
        self._skip_reasons[(int(meta["epoch"]), int(meta["lane"]))] = dict(meta.get("skip_reasons") or {})

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt/invalid by the streams of this run (all epochs and lanes)."""
        return sum(self._skipped.values()) + sum(self._skip_base.values())

    @property
    def skip_reasons(self) -> dict[str, int]:
        """Skipped samples by reason (:func:`~omni_lightning.data.shards.read.skip_reason`), this run in all."""
        out = dict(self._skip_base)
        for reasons in self._skip_reasons.values():
            for r, n in reasons.items():
                out[r] = out.get(r, 0) + int(n)
        return out

    @property
    def trained(self) -> int:
        """Samples trained on so far (every modality)."""
        return sum(self.mix.values())

    def mix_fractions(self) -> dict[str, float]:
        """Share of trained samples per modality so far (equal to the share of batches in within-modality mode)."""
        total = sum(self.mix.values())
        return {m: (n / total if total else 0.0) for m, n in self.mix.items()}

    def begin_epoch(self, trainer_epoch: int | None, rank: int, world_size: int) -> tuple[int, int, dict[str, int]]:
        """``(epoch, offset, extras)`` for the iteration about to start."""
        extras: dict[str, int] = {}
        if self._pending is not None:
            state, self._pending = self._pending, None
            epoch, offset = int(state["epoch"]), int(state["next"])
            per_rank = state.get("extras") or []
            same = int(state.get("num_lanes", 0)) == self.num_lanes and len(per_rank) == world_size
            if not same:
                warnings.warn(
                    f"the checkpoint's stream was read with num_workers lanes={state.get('num_lanes')} on "
                    f"{len(per_rank)} rank(s); this run has {self.num_lanes} lane(s) on {world_size} rank(s): "
                    "training continues at the same step and modality schedule, but not sample for sample. "
                    "Resume with the same data.init_args.num_workers and devices for an exact continuation.",
                    stacklevel=2,
                )
            elif rank < len(per_rank):
                extras = {k: int(v) for k, v in per_rank[rank].items()}
        elif self.started:
            epoch, offset, extras = self.epoch, self.next, dict(self.extras)
            if trainer_epoch is not None and trainer_epoch > epoch:  # the trainer moved on (limit_train_batches)
                epoch, offset, extras = trainer_epoch, 0, {}
        else:
            epoch, offset = (trainer_epoch or 0), 0
        if offset >= self.steps:
            epoch, offset, extras = epoch + 1, 0, {}
        self.epoch, self.next = epoch, offset
        self.extras = dict(extras)
        return epoch, offset, extras

    # -------------------------------------------------------------- checkpoint side
    def state_dict(self, all_extras: list[dict[str, int]] | None = None, limit: int | None = None) -> dict[str, Any]:
        """``all_extras``: every rank's extras (rank order); ``limit``: batches the trainer runs per epoch."""
        epoch, nxt = self.epoch, self.next
        extras = all_extras if all_extras is not None else [dict(self.extras)]
        end = self.steps if limit is None else min(self.steps, int(limit))
        if nxt >= end:  # the epoch is complete: the next one starts from its beginning
            epoch, nxt, extras = epoch + 1, 0, [{} for _ in extras]
        return {
            "version": STATE_VERSION, "epoch": epoch, "next": nxt, "num_lanes": self.num_lanes,
            "steps_per_epoch": self.steps, "extras": extras, "mix": dict(self.mix),
            "schedule": self.schedule.fingerprint(), "skips": self.skip_reasons,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"unknown stream state version {state.get('version')!r} (this code reads "
                             f"{STATE_VERSION}); resume with the omni-lightning version that wrote the checkpoint")
        changed = [k for k, v in self.schedule.fingerprint().items() if state.get("schedule", {}).get(k) != v]
        if int(state.get("steps_per_epoch", -1)) != self.steps:
            changed.append("steps_per_epoch")
        if changed:
            warnings.warn(
                f"resuming with a different data configuration ({', '.join(changed)} changed since the "
                "checkpoint): the run continues from the checkpoint's step, but its batches differ from the "
                "uninterrupted run's.",
                stacklevel=2,
            )
        self._pending = dict(state)
        self.mix = {m: int(state.get("mix", {}).get(m, 0)) for m in self.schedule.modalities}
        self._skip_base = {str(r): int(n) for r, n in (state.get("skips") or {}).items()}
        self._skipped, self._skip_reasons = {}, {}


__all__ = [
    "BalancedSchedule",
    "BalancedStream",
    "StreamProgress",
    "check_sources",
    "check_weights",
    "modality_for_step",
    "resolve_weights",
    "stable_seed",
    "temperature_weights",
]
