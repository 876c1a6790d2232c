"""THE sample schema of omni-lightning shards, written down in one place and validated.

Shards are webdataset tars (see :mod:`omni_lightning.data.shards` for the directory layout). One sample is a
group of tar members sharing a key; the key is ``"{index:08d}"`` (no dots: webdataset splits member names at
the first dot). Members of a sample:

* ``<key>.json`` -- the **record** (UTF-8 JSON object, below);
* one member per media item the record references, named ``<key>.<file>``, e.g. ``00000012.query.png``,
  ``00000012.pos.flac``, ``00000012.neg0.npy``. Webdataset hands them over keyed by ``<file>``
  (``"query.png"``), lower-cased.

The record::

    {
      "task":        str,            # task name, e.g. "demo_image_t2i"
      "modality":    str,            # one of MODALITIES: the modality of the stream / dataset
      "instruction": str,            # instruction for the query side; may be ""
      "query":       ITEM,
      "pos":         ITEM,
      "negs":        [ITEM, ...],    # optional, may be empty: hard negatives for the query
      "label":       str,            # optional; items sharing a label are relevant to each other
                                     # (e.g. the caption id, for evaluation with duplicate captions)
      "meta":        dict            # optional, free-form, JSON-serialisable
    }

    ITEM = {"type": "text",  "text": str}
         | {"type": "image" | "document", "file": "<name>.png"}   # PNG (JPEG also accepted: .jpg/.jpeg)
         | {"type": "video", "file": "<name>.npy"}                # numpy uint8 array [T, H, W, 3]
         | {"type": "audio", "file": "<name>.flac"}               # FLAC (WAV accepted: .wav), mono or
                                                                  # multi-channel, any sample rate
    A media item may also carry "text": str -- a mixed-media item (an image and a question, an audio clip
    and an instruction, as MMEB-V2 and MAEB have them): {"type": "image", "file": "query.png", "text": ...}.

Other keys in the record or in an item are an error (a typo such as ``"positive"`` must fail loudly at
start-up, not silently drop data). Every ``file`` must be present as a member of the same sample.

Decoded sample (what :func:`decode_sample` returns and what the datamodule / processor consume)::

    {"key", "shard", "task", "modality", "instruction", "label" (str or None), "meta" (dict),
     "query": DITEM, "pos": DITEM, "negs": [DITEM, ...]}

    DITEM = {"type": "text", "text": str}
          | {"type": "image" | "document", "image": np.uint8 [H, W, 3] RGB}
          | {"type": "video", "frames": np.uint8 [T, H, W, 3]}
          | {"type": "audio", "waveform": np.float32 [n] (mono: channels averaged), "sample_rate": int}
    (a media DITEM keeps its "text" when the record item has one)

Writers build records with :func:`encode_item`, which turns a DITEM (or raw encoded bytes, for pass-through
of existing PNG/JPEG/FLAC/WAV files) into a record ITEM plus the member bytes. Every problem is reported as a
:class:`SchemaError` naming the shard, the sample key, the field at fault and what was expected.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from omni_lightning.modalities import MODALITIES

__all__ = [
    "SCHEMA_VERSION",
    "MODALITIES",
    "ITEM_TYPES",
    "MEDIA_EXTENSIONS",
    "RECORD_KEYS",
    "SchemaError",
    "validate_record",
    "validate_item",
    "decode_item",
    "decode_sample",
    "encode_item",
    "encode_record",
]

SCHEMA_VERSION = 1
ITEM_TYPES: tuple[str, ...] = MODALITIES  # an item is text or one medium
# Member extensions accepted per media type; the first one is what encode_item writes.
MEDIA_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("png", "jpg", "jpeg"),
    "document": ("png", "jpg", "jpeg"),
    "video": ("npy",),
    "audio": ("flac", "wav"),
}
REQUIRED_KEYS = ("task", "modality", "instruction", "query", "pos")
OPTIONAL_KEYS = ("negs", "label", "meta")
RECORD_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_PNG_COMPRESS_LEVEL = 6


class SchemaError(ValueError):
    """A sample does not follow the schema. The message names shard, key and field, and what is expected."""

    def __init__(self, shard: Any, key: Any, field: str, problem: str, expected: str | None = None):
        self.shard = str(shard)
        self.key = None if key is None else str(key)
        self.field = field
        self.problem = problem
        self.expected = expected
        msg = f"shard {self.shard!r}, sample {self.key!r}, field {field!r}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)

    def __reduce__(self):  # picklable across DataLoader workers
        return (SchemaError, (self.shard, self.key, self.field, self.problem, self.expected))


def _tname(x: Any) -> str:
    return type(x).__name__


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def _member_lookup(members: Collection[str], file: str) -> str | None:
    if file in members:
        return file
    if file.lower() in members:  # webdataset lower-cases member suffixes
        return file.lower()
    return None


def validate_item(item: Any, members: Collection[str] | None, shard: Any, key: Any, field: str) -> None:
    """Check one record ITEM. ``members=None`` skips the member-presence check."""
    if not isinstance(item, Mapping):
        raise SchemaError(shard, key, field, f"is a {_tname(item)}", "an object with a 'type'")
    typ = item.get("type")
    if typ not in ITEM_TYPES:
        raise SchemaError(shard, key, f"{field}.type", f"unknown item type {typ!r}", f"one of {ITEM_TYPES}")
    if typ == "text":
        extra = set(item) - {"type", "text"}
        if extra:
            raise SchemaError(shard, key, field, f"unexpected keys {sorted(extra)} in a text item",
                              "only 'type' and 'text'")
        if not isinstance(item.get("text"), str):
            raise SchemaError(shard, key, f"{field}.text",
                              "missing" if "text" not in item else f"is a {_tname(item.get('text'))}", "a string")
        return
    extra = set(item) - {"type", "file", "text"}
    if extra:
        raise SchemaError(shard, key, field, f"unexpected keys {sorted(extra)} in a {typ} item",
                          "only 'type', 'file' and an optional 'text'")
    if "text" in item and not isinstance(item["text"], str):
        raise SchemaError(shard, key, f"{field}.text", f"is a {_tname(item['text'])}",
                          "a string (the text of a mixed-media item)")
    file = item.get("file")
    exts = MEDIA_EXTENSIONS[typ]
    if not isinstance(file, str) or "." not in file:
        raise SchemaError(shard, key, f"{field}.file", f"is {file!r}",
                          f"a member name such as '{field.split('[')[0]}.{exts[0]}'")
    ext = file.rsplit(".", 1)[1].lower()
    if ext not in exts:
        raise SchemaError(shard, key, f"{field}.file", f"{file!r} has extension {ext!r} for a {typ} item",
                          f"one of {exts}")
    if file.lower() == "json":
        raise SchemaError(shard, key, f"{field}.file", "'json' is reserved for the record", "a media member")
    if members is not None and _member_lookup(members, file) is None:
        present = sorted(m for m in members if not m.startswith("__"))
        raise SchemaError(shard, key, f"{field}.file", f"member {file!r} is not in the sample (members: {present})",
                          "every referenced file stored beside the json")


def validate_record(record: Any, members: Collection[str] | None, shard: Any, key: Any) -> None:
    """Check a record (the parsed ``json`` member) against the schema; raise :class:`SchemaError`.

    ``members`` are the member names of the sample (e.g. ``{"json", "query.png"}``); ``None`` skips the check
    that referenced files are present (used by writers before the members exist).
    """
    if not isinstance(record, Mapping):
        raise SchemaError(shard, key, "json", f"record is a {_tname(record)}", "a JSON object")
    for k in REQUIRED_KEYS:
        if k not in record:
            raise SchemaError(shard, key, k, "missing", f"required keys {REQUIRED_KEYS}")
    extra = set(record) - set(RECORD_KEYS)
    if extra:
        raise SchemaError(shard, key, sorted(extra)[0], f"unknown record keys {sorted(extra)}",
                          f"only {RECORD_KEYS}")
    if not isinstance(record["task"], str) or not record["task"]:
        raise SchemaError(shard, key, "task", f"is {record['task']!r}", "a non-empty string")
    if record["modality"] not in MODALITIES:
        raise SchemaError(shard, key, "modality", f"unknown modality {record['modality']!r}",
                          f"one of {MODALITIES}")
    if not isinstance(record["instruction"], str):
        raise SchemaError(shard, key, "instruction", f"is a {_tname(record['instruction'])}",
                          "a string (may be empty)")
    validate_item(record["query"], members, shard, key, "query")
    validate_item(record["pos"], members, shard, key, "pos")
    negs = record.get("negs", [])
    if not isinstance(negs, list):
        raise SchemaError(shard, key, "negs", f"is a {_tname(negs)}", "a list of items (may be empty)")
    for i, neg in enumerate(negs):
        validate_item(neg, members, shard, key, f"negs[{i}]")
    label = record.get("label")
    if label is not None and not isinstance(label, str):
        raise SchemaError(shard, key, "label", f"is a {_tname(label)}", "a string (or absent)")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise SchemaError(shard, key, "meta", f"is a {_tname(meta)}", "an object (or absent)")


# ----------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------


def _check_finite(arr: np.ndarray, what: str) -> np.ndarray:
    """Reject NaN/inf (a float WAV, a float array): such a sample would turn the loss into NaN."""
    if arr.dtype.kind in "fc":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise NonFiniteMedia(f"non-finite values: {bad} of {arr.size} {what} values are NaN or inf")
    return arr


class NonFiniteMedia(ValueError):
    """Decoded media holding NaN/inf values (a corrupt sample)."""


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode == "F":  # 32-bit float pixels (e.g. a TIFF renamed .png) can hold NaN/inf
            _check_finite(np.asarray(im), "image")
        arr = np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    return np.ascontiguousarray(arr)


def _decode_video(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    _check_finite(arr, "video")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) == 0:
        raise ValueError(f"array has dtype {arr.dtype} and shape {arr.shape}; expected uint8 [T, H, W, 3], T >= 1")
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # np.load from bytes gives a read-only view
        arr = np.array(arr, order="C")
    return arr


def _decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if wav.shape[0] == 0:
        raise ValueError("audio has no samples")
    _check_finite(wav, "audio")
    mono = wav.mean(axis=1, dtype=np.float32) if wav.shape[1] > 1 else wav[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


def decode_item(item: Mapping[str, Any], raw: Mapping[str, Any], shard: Any, key: Any, field: str) -> dict:
    """Decode one (already validated) record ITEM using the member bytes in ``raw``."""
    typ = item["type"]
    if typ == "text":
        return {"type": "text", "text": item["text"]}
    member = _member_lookup(raw.keys(), item["file"])
    if member is None:
        raise SchemaError(shard, key, f"{field}.file", f"member {item['file']!r} is not in the sample",
                          "every referenced file stored beside the json")
    data = raw[member]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(shard, key, member, f"member holds a {_tname(data)}", "raw bytes (read without decoding)")
    text = {"text": item["text"]} if "text" in item else {}  # a mixed-media item
    try:
        if typ in ("image", "document"):
            return {"type": typ, "image": _decode_image(bytes(data)), **text}
        if typ == "video":
            return {"type": "video", "frames": _decode_video(bytes(data)), **text}
        wav, sr = _decode_audio(bytes(data))
        return {"type": "audio", "waveform": wav, "sample_rate": sr, **text}
    except SchemaError:
        raise
    except NonFiniteMedia as exn:
        raise SchemaError(shard, key, f"{field} (member {member!r})", str(exn), "finite values") from exn
    except Exception as exn:  # corrupt bytes: PIL/numpy/soundfile raise many different types
        what = {"image": "a PNG/JPEG image", "document": "a PNG/JPEG page image",
                "video": "a .npy uint8 array [T, H, W, 3]", "audio": "a FLAC/WAV file"}[typ]
        raise SchemaError(shard, key, f"{field} (member {member!r})",
                          f"cannot decode: {type(exn).__name__}: {exn}", what) from exn


def parse_record(data: Any, shard: Any, key: Any) -> dict:
    """Parse the ``json`` member bytes into a dict (raise :class:`SchemaError` on bad bytes)."""
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(shard, key, "json", f"member holds a {_tname(data)}", "UTF-8 JSON bytes")
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SchemaError(shard, key, "json", f"cannot parse: {exn}", "a UTF-8 JSON object") from exn


def decode_sample(raw: Mapping[str, Any], shard: str | None = None) -> dict:
    """Validate and decode one raw webdataset sample (``__key__``, ``__url__``, member bytes by extension).

    Returns the decoded sample described in the module docstring. Raises :class:`SchemaError` (naming shard,
    key and member) for a missing/unparseable record, a schema violation or corrupt media bytes.
    """
    shard = shard if shard is not None else raw.get("__url__", "<unknown shard>")
    key = raw.get("__key__")
    if "json" not in raw:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise SchemaError(shard, key, "json", f"sample has no json member (members: {present})",
                          "a '<key>.json' record in every sample")
    record = parse_record(raw["json"], shard, key)
    members = [k for k in raw if not k.startswith("__")]
    validate_record(record, members, shard, key)
    return {
        "key": key,
        "shard": str(shard),
        "task": record["task"],
        "modality": record["modality"],
        "instruction": record["instruction"],
        "label": record.get("label"),
        "meta": dict(record.get("meta") or {}),
        "query": decode_item(record["query"], raw, shard, key, "query"),
        "pos": decode_item(record["pos"], raw, shard, key, "pos"),
        "negs": [decode_item(n, raw, shard, key, f"negs[{i}]") for i, n in enumerate(record.get("negs", []))],
    }


# ----------------------------------------------------------------------------------------------------------
# encoding (writers)
# ----------------------------------------------------------------------------------------------------------


def _encode_png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"image array has dtype {arr.dtype}; expected uint8")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image array has shape {arr.shape}; expected [H, W, 3]")
        im = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    # No timestamps or text chunks: the same pixels always give the same bytes.
    im.save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _encode_npy(frames: Any) -> bytes:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) == 0:
        raise ValueError(f"video frames have dtype {arr.dtype} and shape {arr.shape}; expected uint8 [T, H, W, 3]")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _encode_flac(waveform: Any, sample_rate: Any) -> bytes:
    import soundfile as sf

    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim not in (1, 2) or wav.shape[0] == 0:
        raise ValueError(f"waveform has shape {wav.shape}; expected [n] or [n, channels] with n >= 1")
    if not np.all(np.isfinite(wav)):
        raise ValueError("waveform contains NaN or inf")
    if not isinstance(sample_rate, (int, np.integer)) or int(sample_rate) <= 0:
        raise ValueError(f"sample_rate is {sample_rate!r}; expected a positive int")
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), int(sample_rate), format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def encode_item(item: Mapping[str, Any], name: str) -> tuple[dict, dict[str, bytes]]:
    """Turn a DITEM-like dict into ``(record ITEM, {member: bytes})`` for a writer.

    ``name`` is the member stem (``"query"``, ``"pos"``, ``"neg0"``). Accepted inputs:

    * ``{"type": "text", "text": str}`` → no member;
    * ``{"type": "image"|"document", "image": uint8 [H, W, 3] array or PIL image}`` → ``<name>.png``;
    * ``{"type": "video", "frames": uint8 [T, H, W, 3]}`` → ``<name>.npy``;
    * ``{"type": "audio", "waveform": float [n] or [n, ch] in [-1, 1], "sample_rate": int}`` → ``<name>.flac``
      (16-bit PCM);
    * pass-through of already encoded bytes: ``{"type": ..., "data": bytes, "ext": "png"|"jpg"|"flac"|...}``
      → ``<name>.<ext>`` (the extension must be allowed for the type; the bytes are stored as they are);
    * any media item with ``"text": str`` as well (a mixed-media item) → the record item keeps the text.

    Raises ``ValueError`` for anything else.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.lower() == "json":
        raise ValueError(f"member name {name!r} must match [A-Za-z0-9_-]+ (no dots) and not be 'json'")
    if not isinstance(item, Mapping):
        raise ValueError(f"item {name!r} is a {_tname(item)}; expected a dict with a 'type'")
    typ = item.get("type")
    if typ not in ITEM_TYPES:
        raise ValueError(f"item {name!r} has unknown type {typ!r}; expected one of {ITEM_TYPES}")
    if typ == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"text item {name!r} needs a string 'text'")
        return {"type": "text", "text": item["text"]}, {}
    if item.get("text") is not None:
        if not isinstance(item["text"], str):
            raise ValueError(f"{typ} item {name!r}: 'text' (of a mixed-media item) must be a string, "
                             f"got {_tname(item['text'])}")
        rec, data = encode_item({k: v for k, v in item.items() if k != "text"}, name)
        return {**rec, "text": item["text"]}, data
    if "data" in item:
        ext = str(item.get("ext", "")).lower().lstrip(".")
        if ext not in MEDIA_EXTENSIONS[typ]:
            raise ValueError(f"{typ} item {name!r}: pass-through extension {ext!r} not in {MEDIA_EXTENSIONS[typ]}")
        data = item["data"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"{typ} item {name!r}: 'data' must be bytes")
        file = f"{name}.{ext}"
        return {"type": typ, "file": file}, {file: bytes(data)}
    try:
        if typ in ("image", "document"):
            if "image" not in item:
                raise ValueError("needs 'image' (uint8 [H, W, 3])")
            file, data = f"{name}.png", _encode_png(item["image"])
        elif typ == "video":
            if "frames" not in item:
                raise ValueError("needs 'frames' (uint8 [T, H, W, 3])")
            file, data = f"{name}.npy", _encode_npy(item["frames"])
        else:
            if "waveform" not in item or "sample_rate" not in item:
                raise ValueError("needs 'waveform' (float [n]) and 'sample_rate' (int)")
            file, data = f"{name}.flac", _encode_flac(item["waveform"], item["sample_rate"])
    except ValueError as exn:
        raise ValueError(f"{typ} item {name!r}: {exn}") from exn
    return {"type": typ, "file": file}, {file: data}


def encode_record(sample: Mapping[str, Any], *, modality: str | None = None, shard: Any = "<writer>",
                  key: Any = None) -> tuple[dict, dict[str, bytes]]:
    """Encode a DITEM-style sample into ``(record, {member: bytes})`` and validate the result.

    ``sample`` has the record keys with DITEMs for ``query``/``pos``/``negs`` (``modality`` may be omitted
    when given as argument; it must match when both are given). Members are named ``query.*``, ``pos.*``,
    ``neg<i>.*``. Raises :class:`SchemaError` naming ``shard``/``key`` on any problem.
    """
    if not isinstance(sample, Mapping):
        raise SchemaError(shard, key, "sample", f"is a {_tname(sample)}", "a dict with the record keys")
    rec_mod = sample.get("modality", modality)
    if modality is not None and rec_mod != modality:
        raise SchemaError(shard, key, "modality", f"sample has modality {rec_mod!r} but is written to a "
                          f"{modality!r} shard set", f"{modality!r}")
    extra = set(sample) - set(RECORD_KEYS) - {"key", "shard"}
    if extra:
        raise SchemaError(shard, key, sorted(extra)[0], f"unknown sample keys {sorted(extra)}", f"only {RECORD_KEYS}")
    members: dict[str, bytes] = {}
    record: dict[str, Any] = {
        "task": sample.get("task"),
        "modality": rec_mod,
        "instruction": sample.get("instruction", ""),
    }
    for field in ("query", "pos"):
        if field not in sample:
            raise SchemaError(shard, key, field, "missing", f"required keys {REQUIRED_KEYS}")
    negs = sample.get("negs") or []
    if not isinstance(negs, (list, tuple)):
        raise SchemaError(shard, key, "negs", f"is a {_tname(negs)}", "a list of items")
    named = [("query", "query", sample["query"]), ("pos", "pos", sample["pos"])]
    named += [(f"negs[{i}]", f"neg{i}", n) for i, n in enumerate(negs)]
    encoded = {}
    for field, stem, item in named:
        try:
            rec_item, data = encode_item(item, stem)
        except ValueError as exn:
            raise SchemaError(shard, key, field, str(exn), "a valid DITEM") from exn
        encoded[field] = rec_item
        members.update(data)
    record["query"], record["pos"] = encoded["query"], encoded["pos"]
    record["negs"] = [encoded[f"negs[{i}]"] for i in range(len(negs))]
    if sample.get("label") is not None:
        record["label"] = sample["label"]
    if sample.get("meta"):
        record["meta"] = sample["meta"]
    validate_record(record, list(members) + ["json"], shard, key)
    return record, members
