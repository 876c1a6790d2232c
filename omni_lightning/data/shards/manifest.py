"""A JSONL manifest of pairs (media as file paths) → shard sets (``omni-lightning shard``); see docs/data.md."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from omni_lightning.data.schema import (
    MEDIA_EXTENSIONS,
    RECORD_KEYS,
    SchemaError,
    _decode_audio,
    _decode_image,
    _decode_video,
)
from omni_lightning.data.shards.write import ShardSetWriter

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


def _load_media(item: Mapping[str, Any], base: Path, field: str, allow_outside: bool = False) -> dict[str, Any]:
    """Manifest media item → DITEM (or pass-through bytes). Raises ValueError with a short message."""
    typ = item["type"]
    rel = item.get("path")
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{field}: a {typ} item needs 'path' (a file relative to the manifest's folder)")
    path = (base / rel)
    if not allow_outside:
        if Path(rel).is_absolute():
            raise ValueError(f"{field}: path {rel!r} is absolute; paths must be relative to the manifest's folder "
                             "(allow_outside=True / --allow-outside accepts it)")
        norm = os.path.normpath(rel)
        if norm == ".." or norm.startswith(".." + os.sep):  # lexical: symlinks the folder's owner made are fine
            raise ValueError(f"{field}: path {rel!r} leads outside the manifest's folder {base} (to "
                             f"{os.path.normpath(base / rel)}); allow_outside=True / --allow-outside accepts it")
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


def _manifest_item(item: Any, base: Path, field: str, allow_outside: bool = False) -> dict[str, Any]:
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
    return _load_media(item, base, field, allow_outside)


def _manifest_samples(path: Path, modality: str, allow_outside: bool = False) -> Iterator[dict[str, Any]]:
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
                    "query": _manifest_item(rec["query"], base, "query", allow_outside),
                    "pos": _manifest_item(rec["pos"], base, "pos", allow_outside),
                    "negs": [_manifest_item(n, base, f"negs[{i}]", allow_outside) for i, n in enumerate(negs)],
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
                   progress: bool = True, allow_outside: bool = False) -> dict[str, Any]:
    """Turn a JSONL manifest into ``out_dir/<modality>/<split>`` shards (atomic; tqdm progress bar).

    One line per pair: ``{"task", "modality", "instruction", "query": ITEM, "pos": ITEM, "negs": [ITEM...],
    "label", "meta"}`` where ``ITEM = {"type": "text", "text": ...}`` or ``{"type": "image"|"document"|"video"|
    "audio", "path": <relative to the manifest's folder>}``: ``.png``/``.jpg`` images (stored as they are;
    other PIL formats re-encoded as PNG), ``.npy`` uint8 ``[T, H, W, 3]`` or a folder of frame images for
    video, ``.wav``/``.flac`` audio (stored as they are; other soundfile formats re-encoded as FLAC).
    ``task`` defaults to the manifest's file stem, ``modality`` to the argument, ``instruction`` to ``""``.
    A malformed line or a missing/unreadable file raises :class:`ManifestError` naming the line; nothing is
    written then. A path that is absolute or leads outside the manifest's folder (``../``)
    is such an error unless ``allow_outside=True``. Returns the index (+ ``dir``).
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
            for lineno, sample in _manifest_samples(path, modality, allow_outside):
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
