"""Reading W&B offline run files without the network: what a run recorded (the tests check the catalogue against it)."""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------------ offline runs
@dataclass
class OfflineRun:
    """What an offline run file recorded: history keys, the last summary values, step-metric definitions."""

    path: Path
    run_id: str
    history_keys: set[str]
    summary: dict[str, Any]
    step_metrics: dict[str, str]  # metric name or glob -> its step metric
    config: dict[str, Any]
    artifacts: dict[str, dict[str, str]]  # artifact name -> {path in the artifact: staged local file}
    complete: bool  # the run's exit record is written (W&B writes the file from a separate process)

    def has(self, key: str) -> bool:
        """Whether the run logged ``key``: a scalar, or a table / media value (stored as ``key/_type``, ...)."""
        return key in self.history_keys or f"{key}/_type" in self.history_keys


def _records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    block, pos, partial = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            partial = chunk
            continue
        elif kind == 3:
            partial += chunk
            continue
        else:
            payload, partial = partial + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def read_offline_run(run_dir: str | os.PathLike) -> OfflineRun:
    """Read an offline run folder (``.../wandb/offline-run-<time>-<id>``) without W&B's servers."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-<id>.wandb file in {run_dir}")
    keys: set[str] = set()
    summary: dict[str, Any] = {}
    steps: dict[str, str] = {}
    config: dict[str, Any] = {}
    artifacts: dict[str, dict[str, str]] = {}
    complete = False
    rid = files[0].stem.removeprefix("run-")
    for rec in _records(files[0]):
        kind = rec.WhichOneof("record_type")
        complete = complete or kind == "exit"
        if kind == "history":
            keys.update(it.key or "/".join(it.nested_key) for it in rec.history.item)
        elif kind == "summary":
            for it in rec.summary.update:
                path = [it.key] if it.key else list(it.nested_key)
                d = summary
                for part in path[:-1]:  # a table or media value: {"_type": ..., "path": ..., ...}
                    d = d.setdefault(part, {})
                d[path[-1]] = json.loads(it.value_json)
        elif kind == "metric":
            m = rec.metric
            if m.step_metric:
                steps[m.name or m.glob_name] = m.step_metric
        elif kind == "artifact":  # e.g. the table a run logged, with its media (staged until `wandb sync`)
            artifacts[rec.artifact.name] = {e.path: e.local_path for e in rec.artifact.manifest.contents}
        elif kind in ("config", "run"):  # wandb.init(config=...) travels in the run record
            for it in (rec.config if kind == "config" else rec.run.config).update:
                config[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return OfflineRun(run_dir, rid, keys, summary, steps, config, artifacts, complete)


def offline_runs(save_dir: str | os.PathLike, wait: float = 0.0) -> list[OfflineRun]:
    """Every offline run under ``save_dir`` (searched recursively), oldest first. ``wait``: seconds to wait for
    runs that just finished until W&B's service has written their files completely."""
    deadline = time.monotonic() + wait
    while True:
        runs = [read_offline_run(d) for d in sorted(Path(save_dir).rglob("offline-run-*")) if d.is_dir()]
        if all(r.complete for r in runs) or time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)
