"""Shard schema, shard sets, manifest sharding and the demo corpus (omni_lightning.data)."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from conftest import corrupt_member
from PIL import Image

from omni_lightning.data.schema import (
    MODALITIES,
    SchemaError,
    decode_sample,
    encode_item,
    validate_record,
)
from omni_lightning.data.shards import (
    ManifestError,
    ShardSetWriter,
    SkipCounter,
    check_shards,
    iter_samples,
    read_index,
    shard_manifest,
    write_shards,
)
from omni_lightning.demo import (
    DEMO_INSTRUCTIONS,
    demo_captions,
    demo_vocabulary,
    make_demo_data,
)

SHARD = "/data/x/shard-000003.tar"
KEY = "00000042"


def _rng(seed=0):
    return np.random.default_rng(seed)


def _all_types_sample(i: int, rng) -> dict:
    """A sample (modality 'image') that uses every item type once."""
    stereo = rng.uniform(-0.8, 0.8, size=(1234 + i, 2)).astype(np.float32)
    return {
        "task": "roundtrip",
        "modality": "image",
        "instruction": "" if i % 2 else "find it",
        "query": {"type": "text", "text": f"query {i} ünïcode"},
        "pos": {"type": "image", "image": rng.integers(0, 256, (17 + i, 23, 3), dtype=np.uint8)},
        "negs": [
            {"type": "document", "image": rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)},
            {"type": "video", "frames": rng.integers(0, 256, (3 + i % 2, 8, 12, 3), dtype=np.uint8)},
            {"type": "audio", "waveform": rng.uniform(-0.9, 0.9, 800 + i).astype(np.float32),
             "sample_rate": 16000},
            {"type": "audio", "waveform": stereo, "sample_rate": 22050},
            {"type": "text", "text": "a negative"},
        ],
        "label": f"L{i % 3}",
        "meta": {"i": i, "nested": {"a": [1, 2]}},
    }


def _assert_item_equal(dec: dict, src: dict) -> None:
    assert dec["type"] == src["type"]
    if src["type"] == "text":
        assert dec["text"] == src["text"]
    elif src["type"] in ("image", "document"):
        assert dec["image"].dtype == np.uint8 and dec["image"].shape == src["image"].shape
        assert dec["image"].flags.writeable
        np.testing.assert_array_equal(dec["image"], src["image"])
    elif src["type"] == "video":
        assert dec["frames"].dtype == np.uint8 and dec["frames"].flags.writeable
        np.testing.assert_array_equal(dec["frames"], src["frames"])
    else:
        w = np.asarray(src["waveform"], np.float32)
        mono = w.mean(axis=1) if w.ndim == 2 else w
        assert dec["waveform"].dtype == np.float32 and dec["waveform"].ndim == 1
        assert dec["sample_rate"] == src["sample_rate"]
        # 16-bit FLAC: quantisation step 2**-15 (per channel before averaging)
        np.testing.assert_allclose(dec["waveform"], mono, atol=2.0 ** -15 + 1e-6)


def _small_image_samples(n: int, seed: int = 0) -> list[dict]:
    rng = _rng(seed)
    return [{"task": "t", "modality": "image", "instruction": "", "query": {"type": "text", "text": f"q{i}"},
             "pos": {"type": "image", "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)},
             "label": str(i)} for i in range(n)]


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_every_item_type(tmp_path):
    rng = _rng(1)
    samples = [_all_types_sample(i, rng) for i in range(5)]
    index = write_shards(samples, tmp_path, "image", "train", max_per_shard=2)
    assert index["num_samples"] == 5 and [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    d = tmp_path / "image" / "train"
    assert sorted(p.name for p in d.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                   "shard-000002.tar"]
    on_disk = json.loads((d / "index.json").read_text())
    assert on_disk == {"modality": "image", "split": "train", "num_samples": 5, "schema_version": 1,
                       "shards": [{"file": f"shard-00000{i}.tar", "num_samples": n} for i, n in enumerate([2, 2, 1])]}
    assert check_shards(d, n=2) == {"shards": 3, "samples_checked": 5, "modality": "image"}

    pipe = iter_samples(d)
    out = list(pipe)
    assert pipe.skips.count == 0
    assert [s["key"] for s in out] == [f"{i:08d}" for i in range(5)]
    for dec, src in zip(out, samples):
        assert dec["task"] == "roundtrip" and dec["modality"] == "image"
        assert dec["instruction"] == src["instruction"] and dec["label"] == src["label"]
        assert dec["meta"] == src["meta"]
        assert dec["shard"].endswith(".tar")
        _assert_item_equal(dec["query"], src["query"])
        _assert_item_equal(dec["pos"], src["pos"])
        assert len(dec["negs"]) == len(src["negs"])
        for a, b in zip(dec["negs"], src["negs"]):
            _assert_item_equal(a, b)

    # members are named after the fields; keys are "%08d"
    with tarfile.open(d / "shard-000000.tar") as tf:
        names = tf.getnames()
    assert "00000000.json" in names and "00000000.pos.png" in names and "00000000.neg1.npy" in names
    assert "00000000.neg2.flac" in names


def test_writes_are_byte_reproducible(tmp_path):
    for sub in ("a", "b"):
        write_shards(_small_image_samples(6), tmp_path / sub, "image", "eval", max_per_shard=4)
    for name in ("shard-000000.tar", "shard-000001.tar", "index.json"):
        assert (tmp_path / "a/image/eval" / name).read_bytes() == (tmp_path / "b/image/eval" / name).read_bytes()
    # a size limit also starts new shards
    index = write_shards(_small_image_samples(3), tmp_path / "c", "image", "eval", max_shard_bytes=1)
    assert [s["num_samples"] for s in index["shards"]] == [1, 1, 1]


def test_encode_item_shapes_and_errors():
    rec, members = encode_item({"type": "text", "text": "hi"}, "query")
    assert rec == {"type": "text", "text": "hi"} and members == {}
    rec, members = encode_item({"type": "video", "frames": np.zeros((2, 4, 4, 3), np.uint8)}, "neg0")
    assert rec == {"type": "video", "file": "neg0.npy"} and list(members) == ["neg0.npy"]
    rec, members = encode_item({"type": "audio", "data": b"fLaC...", "ext": "flac"}, "pos")
    assert rec == {"type": "audio", "file": "pos.flac"} and members == {"pos.flac": b"fLaC..."}
    with pytest.raises(ValueError, match="uint8"):
        encode_item({"type": "image", "image": np.zeros((4, 4, 3), np.float32)}, "pos")
    with pytest.raises(ValueError, match="no dots"):
        encode_item({"type": "text", "text": "x"}, "a.b")
    with pytest.raises(ValueError, match="unknown type"):
        encode_item({"type": "smell"}, "pos")


# ------------------------------------------------------------------------------------------------ schema errors


def _good_record():
    return {"task": "t", "modality": "image", "instruction": "", "query": {"type": "text", "text": "q"},
            "pos": {"type": "image", "file": "pos.png"}, "negs": [{"type": "audio", "file": "neg0.flac"}]}


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("pos"), "pos"),
        (lambda r: r.pop("task"), "task"),
        (lambda r: r.update(modality="smell"), "modality"),
        (lambda r: r["pos"].update(type="hologram"), "pos.type"),
        (lambda r: r["negs"][0].update(file="neg0.npy"), "negs[0].file"),  # wrong extension for audio
        (lambda r: r["negs"].append({"type": "video", "file": "neg1.npy"}), "negs[1].file"),  # member missing
        (lambda r: r.update(positive=r["pos"]), "positive"),  # unknown key (typo)
        (lambda r: r.update(label=3), "label"),
        (lambda r: r["query"].update(text=None), "query.text"),
        (lambda r: r.update(negs={"type": "text"}), "negs"),
    ],
)
def test_validate_record_errors_name_shard_key_field(mutate, field):
    members = {"json", "pos.png", "neg0.flac"}
    validate_record(_good_record(), members, SHARD, KEY)  # the unmutated record is fine
    rec = _good_record()
    mutate(rec)
    with pytest.raises(SchemaError) as ei:
        validate_record(rec, members, SHARD, KEY)
    msg = str(ei.value)
    assert SHARD in msg and KEY in msg and field in msg
    assert "expected" in msg
    assert ei.value.field.startswith(field.split(".")[0])
    assert pickle.loads(pickle.dumps(ei.value)).args == ei.value.args


def test_decode_sample_errors():
    png = encode_item({"type": "image", "image": np.zeros((4, 4, 3), np.uint8)}, "pos")[1]["pos.png"]
    rec = {"task": "t", "modality": "image", "instruction": "", "query": {"type": "text", "text": "q"},
           "pos": {"type": "image", "file": "pos.png"}}
    raw = {"__key__": KEY, "__url__": SHARD, "json": json.dumps(rec).encode(), "pos.png": png}
    out = decode_sample(raw, SHARD)
    assert out["pos"]["image"].shape == (4, 4, 3) and out["label"] is None and out["negs"] == []

    with pytest.raises(SchemaError, match=r"pos\.png.*cannot decode"):
        decode_sample(dict(raw, **{"pos.png": png[:20] + b"\x00" * 30}), SHARD)
    with pytest.raises(SchemaError, match="no json member"):
        decode_sample({k: v for k, v in raw.items() if k != "json"}, SHARD)
    with pytest.raises(SchemaError, match="cannot parse"):
        decode_sample(dict(raw, json=b"{not json"), SHARD)
    with pytest.raises(SchemaError, match="not in the sample"):
        decode_sample({k: v for k, v in raw.items() if k != "pos.png"}, SHARD)
    bad_video = io.BytesIO()
    np.save(bad_video, np.zeros((4, 4), np.float32))
    rec_v = dict(rec, pos={"type": "video", "file": "pos.npy"})
    with pytest.raises(SchemaError, match=r"uint8 \[T, H, W, 3\]"):
        decode_sample({"__key__": KEY, "json": json.dumps(rec_v).encode(), "pos.npy": bad_video.getvalue()}, SHARD)
    with pytest.raises(ValueError) as ei:  # SchemaError is a ValueError
        decode_sample(dict(raw, json=b"[]"), SHARD)
    assert isinstance(ei.value, SchemaError) and SHARD in str(ei.value) and KEY in str(ei.value)


def test_writer_rejects_invalid_samples(tmp_path):
    s = _small_image_samples(1)[0]
    with pytest.raises(SchemaError, match="modality"):
        write_shards([dict(s, modality="audio")], tmp_path, "image", "train")
    with pytest.raises(SchemaError, match="unknown sample keys"):
        write_shards([dict(s, positive=s["pos"])], tmp_path, "image", "train")
    with pytest.raises(SchemaError, match="JSON"):
        write_shards([dict(s, meta={"x": object()})], tmp_path, "image", "train")
    assert not (tmp_path / "image" / "train").exists()


def test_check_shards_reports_wrong_schema_at_start_up(tmp_path):
    d = tmp_path / "audio" / "train"
    write_shards([{"task": "t", "instruction": "", "query": {"type": "text", "text": "q"},
                   "pos": {"type": "audio", "waveform": np.zeros(100, np.float32), "sample_rate": 8000}}],
                 tmp_path, "audio", "train")
    assert check_shards(d)["samples_checked"] == 1
    # a foreign shard written with another schema ("positive" instead of "pos")
    with open(d / "shard-000000.tar", "wb") as f, wds.TarWriter(f, encoder=False) as tw:
        tw.write({"__key__": "00000000", "json": json.dumps({"task": "t", "modality": "audio", "instruction": "",
                                                             "query": {"type": "text", "text": "q"},
                                                             "positive": {"type": "text", "text": "p"}}).encode()})
    with pytest.raises(SchemaError) as ei:
        check_shards(d)
    assert "shard-000000.tar" in str(ei.value) and "00000000" in str(ei.value) and "'pos'" in str(ei.value)
    # modality mismatch between index and records
    idx = json.loads((d / "index.json").read_text())
    idx["modality"] = "image"
    (d / "index.json").write_text(json.dumps(idx))
    write_shards([{"task": "t", "instruction": "", "query": {"type": "text", "text": "q"},
                   "pos": {"type": "audio", "waveform": np.zeros(100, np.float32), "sample_rate": 8000}}],
                 tmp_path, "audio", "train", overwrite=True)
    with pytest.raises(SchemaError, match="modality"):
        check_shards(d, modality="image")
    # not a tar at all
    (d / "shard-000000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(SchemaError, match="shard-000000.tar"):
        check_shards(d)


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path / "empty")
    write_shards(_small_image_samples(4), tmp_path, "image", "train", max_per_shard=2)
    d = tmp_path / "image" / "train"
    idx = read_index(d)
    assert len(idx["urls"]) == 2 and all(os.path.isabs(u) for u in idx["urls"])
    (d / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar.*index\.json"):
        read_index(d)
    (d / "index.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_index(d)


# ------------------------------------------------------------------------------------------------ reading


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    samples = _small_image_samples(6)
    write_shards(samples, tmp_path, "image", "train", max_per_shard=3)
    d = tmp_path / "image" / "train"
    corrupt_member(d / "shard-000000.tar", "00000001.pos.png")
    counter = SkipCounter()
    with caplog.at_level("WARNING"):
        out = list(iter_samples(d, handler_skips=counter))
    assert counter.count == 1
    assert [s["key"] for s in out] == ["00000000", "00000002", "00000003", "00000004", "00000005"]
    for s in out:
        np.testing.assert_array_equal(s["pos"]["image"], samples[int(s["key"])]["pos"]["image"])
    assert "00000001" in counter.reasons[0] and "shard-000000.tar" in counter.reasons[0]
    assert len(counter.per_shard) == 1
    assert sum("shard-000000.tar" in r.getMessage() for r in caplog.records) == 1
    # picklable (DataLoader workers get a copy)
    clone = pickle.loads(pickle.dumps(counter))
    assert clone.count == 1 and clone.reasons == counter.reasons
    # start-up check reads only the first sample per shard by default; n=2 finds the corrupt one
    check_shards(d, n=1)
    with pytest.raises(SchemaError, match="00000001"):
        check_shards(d, n=2)


def test_truncated_shard_is_skipped_not_fatal(tmp_path):
    write_shards(_small_image_samples(6), tmp_path, "image", "train", max_per_shard=3)
    d = tmp_path / "image" / "train"
    tar = d / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 3])
    pipe = iter_samples(d)
    keys = [s["key"] for s in pipe]
    assert keys[:3] == ["00000000", "00000001", "00000002"] and len(keys) < 6
    assert pipe.skips.count >= 1


def test_consecutive_skip_guard(tmp_path):
    write_shards(_small_image_samples(5), tmp_path, "image", "train")
    tar = tmp_path / "image" / "train" / "shard-000000.tar"
    for i in range(5):
        corrupt_member(tar, f"{i:08d}.json")
    with pytest.raises(SchemaError, match="consecutive"):
        list(iter_samples(tar, max_consecutive_skips=3))
    assert list(iter_samples(str(tar), max_consecutive_skips=0)) == []


def test_resampled_and_shuffled_streams_are_seeded(tmp_path):
    write_shards(_small_image_samples(12), tmp_path, "image", "train", max_per_shard=3)
    d = tmp_path / "image" / "train"

    def keys(**kw):
        return [s["key"] for s in iter_samples(d, **kw).with_epoch(20)]

    a, b, c = keys(resampled=True, seed=1, shuffle_buffer=4), keys(resampled=True, seed=1, shuffle_buffer=4), \
        keys(resampled=True, seed=2, shuffle_buffer=4)
    assert len(a) == 20 and a == b and a != c
    once = [s["key"] for s in iter_samples(d, shardshuffle=True, shuffle_buffer=5, seed=3)]
    assert sorted(once) == [f"{i:08d}" for i in range(12)] and once != sorted(once)
    assert once == [s["key"] for s in iter_samples(d, shardshuffle=True, shuffle_buffer=5, seed=3)]


def test_split_by_node(tmp_path, monkeypatch):
    write_shards(_small_image_samples(8), tmp_path, "image", "train", max_per_shard=2)
    d = tmp_path / "image" / "train"
    got = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        got.append({s["key"] for s in iter_samples(d)})
        assert len({s["key"] for s in iter_samples(d, split_nodes=False)}) == 8
    assert got[0].isdisjoint(got[1]) and len(got[0] | got[1]) == 8


# ------------------------------------------------------------------------------------------------ writing


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def gen():
        yield from _small_image_samples(5)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_shards(gen(), tmp_path / "root", "image", "train", max_per_shard=2)
    assert not (tmp_path / "root" / "image" / "train").exists()
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))

    # an existing set survives a failed overwrite untouched
    write_shards(_small_image_samples(3), tmp_path, "image", "train")
    before = (tmp_path / "image/train/shard-000000.tar").read_bytes()
    with pytest.raises(RuntimeError):
        write_shards(gen(), tmp_path, "image", "train", overwrite=True)
    assert (tmp_path / "image/train/shard-000000.tar").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["train"]

    with pytest.raises(RuntimeError):
        with ShardSetWriter(tmp_path, "image", "eval") as w:
            w.write(_small_image_samples(1)[0])
            raise RuntimeError("boom")
    assert not (tmp_path / "image" / "eval").exists()

    # a writer dropped without commit/abort cleans up after itself
    w = ShardSetWriter(tmp_path, "image", "eval")
    w.write(_small_image_samples(1)[0])
    tmp = w.tmp
    assert tmp.exists()
    del w
    assert not tmp.exists() and not (tmp_path / "image" / "eval").exists()


def test_overwrite_refused_unless_asked(tmp_path):
    write_shards(_small_image_samples(3), tmp_path, "image", "train")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(_small_image_samples(4), tmp_path, "image", "train")
    assert read_index(tmp_path / "image" / "train")["num_samples"] == 3
    write_shards(_small_image_samples(4), tmp_path, "image", "train", overwrite=True)
    assert read_index(tmp_path / "image" / "train")["num_samples"] == 4
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path, "image", "eval")
    assert not (tmp_path / "image" / "eval").exists()
    with pytest.raises(ValueError, match="unknown modality"):
        write_shards([], tmp_path, "smell", "eval")
    # a caller that catches a rejected sample and goes on gets no empty trailing shard
    with ShardSetWriter(tmp_path, "image", "eval", max_per_shard=2) as w:
        for s in _small_image_samples(2):
            w.write(s)
        with pytest.raises(SchemaError):
            w.write({"task": "t"})
    assert read_index(tmp_path / "image" / "eval")["num_samples"] == 2
    check_shards(tmp_path / "image" / "eval")


# ------------------------------------------------------------------------------------------------ manifest


def _make_manifest_files(base: Path, rng) -> dict:
    img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(img).save(base / "a.png")
    Image.fromarray(img).save(base / "b.jpg", quality=95)
    vid = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    np.save(base / "v.npy", vid)
    (base / "frames").mkdir()
    for t in range(3):
        Image.fromarray(vid[t]).save(base / "frames" / f"{t:03d}.png")
    wav = (rng.uniform(-0.5, 0.5, 400)).astype(np.float32)
    sf.write(base / "s.wav", wav, 8000, subtype="PCM_16")
    sf.write(base / "s.flac", np.stack([wav, -wav], 1), 16000, subtype="PCM_16")
    return {"img": img, "vid": vid, "wav": wav}


def _write_manifest(path: Path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_manifest_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ref = _make_manifest_files(src, _rng(3))
    lines = [
        {"task": "mt", "modality": "video", "instruction": "find", "query": {"type": "text", "text": "q0"},
         "pos": {"type": "video", "path": "v.npy"}, "negs": [{"type": "video", "path": "frames"}], "label": "x"},
        {"task": "mt", "query": {"type": "image", "path": "a.png"}, "pos": {"type": "video", "path": "frames"},
         "negs": [{"type": "audio", "path": "s.wav"}, {"type": "audio", "path": "s.flac"},
                  {"type": "document", "path": "b.jpg"}], "meta": {"k": 1}},
    ]
    _write_manifest(src / "pairs.jsonl", [lines[0], "", lines[1]])
    index = shard_manifest(src / "pairs.jsonl", tmp_path / "out", "video", "train", progress=False)
    assert index["num_samples"] == 2
    out = list(iter_samples(tmp_path / "out" / "video" / "train"))
    assert len(out) == 2
    a, b = out
    assert a["task"] == "mt" and a["instruction"] == "find" and a["label"] == "x" and a["query"]["text"] == "q0"
    np.testing.assert_array_equal(a["pos"]["frames"], ref["vid"])
    np.testing.assert_array_equal(a["negs"][0]["frames"], ref["vid"])
    assert b["instruction"] == "" and b["label"] is None and b["meta"] == {"k": 1}
    np.testing.assert_array_equal(b["query"]["image"], ref["img"])
    np.testing.assert_array_equal(b["pos"]["frames"], ref["vid"])
    np.testing.assert_allclose(b["negs"][0]["waveform"], ref["wav"], atol=2.0 ** -15 + 1e-6)
    assert b["negs"][0]["sample_rate"] == 8000 and b["negs"][1]["sample_rate"] == 16000
    np.testing.assert_allclose(b["negs"][1]["waveform"], 0.0, atol=2.0 ** -15)  # (w + -w) / 2
    assert b["negs"][2]["type"] == "document" and b["negs"][2]["image"].shape == (10, 12, 3)
    # png/jpg/wav/flac are stored as they are
    with tarfile.open(tmp_path / "out/video/train/shard-000000.tar") as tf:
        names = set(tf.getnames())
    assert {"00000001.query.png", "00000001.neg0.wav", "00000001.neg1.flac", "00000001.neg2.jpg"} <= names


@pytest.mark.parametrize(
    "bad_line, pattern",
    [
        ('{"task": "t", "query": ', "not valid JSON"),
        ({"query": {"type": "text", "text": "q"}, "pos": {"type": "image", "path": "missing.png"}},
         r"pos: file 'missing.png' not found"),
        ({"query": {"type": "text", "text": "q"}, "pos": {"type": "smell", "path": "a.png"}}, "unknown type"),
        ({"query": {"type": "text", "text": "q"}}, "missing 'pos'"),
        ({"query": {"type": "text", "text": "q"}, "pos": {"type": "image", "path": "s.wav"}},
         "cannot be read as image"),
        ({"query": {"type": "text", "text": "q"}, "pos": {"type": "text", "text": "p"}, "modality": "audio"},
         "modality"),
        ({"query": {"type": "text", "text": "q"}, "pos": {"type": "text", "text": "p"}, "label": 5}, "label"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, bad_line, pattern):
    src = tmp_path / "src"
    src.mkdir()
    _make_manifest_files(src, _rng(0))
    good = {"query": {"type": "text", "text": "q"}, "pos": {"type": "image", "path": "a.png"}}
    _write_manifest(src / "m.jsonl", [good, good, bad_line, good])
    with pytest.raises(ManifestError, match=pattern) as ei:
        shard_manifest(src / "m.jsonl", tmp_path / "out", "image", "train", progress=False)
    assert "line 3" in str(ei.value) and "m.jsonl" in str(ei.value)
    assert not (tmp_path / "out" / "image" / "train").exists()


# ------------------------------------------------------------------------------------------------ demo


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_deterministic_and_structured(tmp_path):
    kw = dict(n_train=40, n_eval=12, max_per_shard=16)
    s1 = make_demo_data(tmp_path / "a", seed=0, **kw)
    make_demo_data(tmp_path / "b", seed=0, workers=1, **kw)
    make_demo_data(tmp_path / "c", seed=1, **kw)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "same seed must give byte-identical shards"
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".tar")), "a different seed must give different shards"

    with pytest.raises(FileExistsError):
        make_demo_data(tmp_path / "a", seed=0, **kw)
    make_demo_data(tmp_path / "a", seed=0, overwrite=True, modalities=("audio",), **kw)
    assert _tree_bytes(tmp_path / "a")["audio/train/shard-000000.tar"] == a["audio/train/shard-000000.tar"]
    assert set(json.loads((tmp_path / "a" / "demo.json").read_text())["modalities"]) == set(MODALITIES)

    captions = demo_captions()
    assert {k: len(v) for k, v in captions.items()} == {"image": 100, "video": 40, "document": 100, "audio": 100}
    assert len(set(captions["image"])) == 100 and len(set(captions["audio"])) == 100
    assert set(s1["modalities"]) == set(MODALITIES)
    for m in MODALITIES:
        info = s1["modalities"][m]
        assert info["train"]["num_samples"] == 40 and info["train"]["num_shards"] == 3
        assert info["eval"]["num_samples"] == 12 and info["eval"]["num_shards"] == 1
        check_shards(tmp_path / "a" / m / "train", n=2)
        train = list(iter_samples(tmp_path / "a" / m / "train"))
        evals = list(iter_samples(tmp_path / "a" / m / "eval"))
        assert len(train) == 40 and len(evals) == 12
        train_labels = {s["label"] for s in train}
        assert len(train_labels) == min(40, info["num_captions"]) == info["train"]["num_labels"]
        assert {s["label"] for s in evals} <= train_labels
        for s in train + evals:
            assert s["modality"] == m and s["instruction"] == DEMO_INSTRUCTIONS[m]
            assert s["query"]["type"] == "text"
            assert s["pos"]["type"] == m and len(s["negs"]) == 1 and s["negs"][0]["type"] == m
            assert s["meta"]["neg_labels"][0] != s["label"]
            if m != "text":
                assert s["query"]["text"] == s["meta"]["caption"]
        if m in ("image", "video", "document"):  # train and eval draw disjoint source digits
            src_train = {d for s in train for d in s["meta"]["source_digits"]}
            src_eval = {d for s in evals for d in s["meta"]["source_digits"]}
            assert src_train.isdisjoint(src_eval)
        p = train[0]["pos"]
        if m == "image":
            assert p["image"].shape == (32, 32, 3)
        elif m == "document":
            assert p["image"].shape == (32, 64, 3)
        elif m == "video":
            assert p["frames"].shape == (4, 32, 32, 3)
        elif m == "audio":
            assert p["sample_rate"] == 16000 and p["waveform"].shape == (16000,)
    vocab = demo_vocabulary()
    assert set(captions["video"]) <= set(vocab) and set(DEMO_INSTRUCTIONS.values()) <= set(vocab)
    text_train = list(iter_samples(tmp_path / "a" / "text" / "train"))
    assert all(s["pos"]["text"] in vocab and s["pos"]["text"] != s["query"]["text"] for s in text_train)


def test_diag_split_never_touches_eval(tmp_path):
    """The diagnostic split (for choosing α) holds new instances of train-pool digits: no eval source digit,
    no sample equal to a train or eval sample."""
    make_demo_data(tmp_path, n_train=40, n_eval=20, n_diag=20, modalities=["image", "audio"], max_per_shard=40)
    for m in ("image", "audio"):
        split = {s: list(iter_samples(tmp_path / m / s)) for s in ("train", "eval", "diag")}
        assert len(split["diag"]) == 20
        key = (lambda x: x["pos"]["image"].tobytes()) if m == "image" else (lambda x: x["pos"]["waveform"].tobytes())
        diag = {key(x) for x in split["diag"]}
        assert diag.isdisjoint(key(x) for x in split["train"]) and diag.isdisjoint(key(x) for x in split["eval"])
        if m == "image":
            src = {s: {d for x in split[s] for d in x["meta"]["source_digits"]} for s in split}
            assert src["diag"].isdisjoint(src["eval"])
