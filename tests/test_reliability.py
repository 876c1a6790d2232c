"""Nothing lost, nothing silently wrong: outputs kept apart from inputs, leftovers of killed writes, non-finite
values, too many skipped samples, checkpoints written atomically and resumed with a fallback, preemption outside
a training batch, GradCache under every CPU precision, shard permissions and manifest paths."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import corrupt_member, fit_args

from omni_lightning.utils import check_output_apart

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "configs/specialist/image.yaml"


# ----------------------------------------------------------------------------------------- outputs apart
@pytest.mark.parametrize("relation", ["equal", "parent", "inside", "symlink"])
def test_check_output_apart_refuses_overlap_both_ways(tmp_path, relation):
    model = tmp_path / "p" / "base"
    model.mkdir(parents=True)
    out = {"equal": model, "parent": tmp_path / "p", "inside": model / "out",
           "symlink": tmp_path / "link"}[relation]
    if relation == "symlink":
        out.symlink_to(model, target_is_directory=True)
    with pytest.raises(ValueError, match=r"--out .* the model .*base"):
        check_output_apart(out, {"model": model, "data": None}, "--out")
    assert check_output_apart(tmp_path / "p" / "elsewhere", {"model": model}, "--out") == (tmp_path / "p/elsewhere")


@pytest.mark.parametrize("where", ["model_parent", "data_root", "existing"])
def test_fit_refuses_an_export_dir_that_overlaps_an_input_or_exists(tiny_model_dir, demo_root, tmp_path, where):
    """Before the first step, with the inputs untouched: the model's own folder's parent, a folder inside the data
    root, and an existing folder without model.init_args.export_overwrite."""
    import shutil

    from omni_lightning.app.cli import main

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    out = {"model_parent": tmp_path / "models", "data_root": Path(demo_root) / "exported",
           "existing": tmp_path / "old-export"}[where]
    if where == "existing":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = fit_args(IMAGE, model, demo_root, out)
    expected = FileExistsError if where == "existing" else ValueError
    with pytest.raises(expected, match="export_dir|export_overwrite"):
        main(args)
    assert sorted(p.name for p in model.iterdir()) == before
    assert not (Path(demo_root) / "exported").exists()
    if where == "existing":
        assert (out / "keep.txt").read_text() == "mine"
        assert not list((tmp_path / "lightning").glob("**/*.ckpt"))


# ----------------------------------------------------------------------------------------- shards
def _image_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"task": "t", "modality": "image", "instruction": "",
             "query": {"type": "text", "text": f"caption {i}"},
             "pos": {"type": "image", "image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)}} for i in range(n)]


def test_leftovers_of_a_killed_shard_write_are_removed_by_the_next_write(tmp_path):
    from omni_lightning.data.shards import read_index, write_shards

    parent = tmp_path / "image"
    for name in (".train.tmp-dead1", ".train.old-dead2"):  # what a kill -9 mid-write / mid-commit leaves
        (parent / name).mkdir(parents=True)
        (parent / name / "index.json").write_text('{"num_samples": 99}')
        (parent / name / "shard-000000.tar").write_bytes(b"partial")
    (parent / ".eval.tmp-other").mkdir()  # another output's: not this write's business
    with pytest.raises(FileNotFoundError):
        read_index(parent / "train")  # a leftover is never taken for the result
    index = write_shards(_image_samples(3), tmp_path, "image", "train")
    assert index["num_samples"] == 3
    assert sorted(p.name for p in parent.iterdir()) == [".eval.tmp-other", "train"]


def test_a_second_concurrent_write_to_the_same_output_is_refused(tmp_path):
    from omni_lightning.data.shards import ShardSetWriter

    with ShardSetWriter(tmp_path, "image", "train") as first:
        first.write(_image_samples(1)[0])
        with pytest.raises(FileExistsError, match="another write to .*train is in progress"):
            ShardSetWriter(tmp_path, "image", "train")
        assert first.tmp.exists()  # the refused writer did not take the live one for a leftover
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["train"]


def test_shard_outputs_follow_the_umask(tmp_path):
    from omni_lightning.data.shards import write_shards
    from omni_lightning.utils import _umask

    umask = _umask()
    index = write_shards(_image_samples(2), tmp_path / "root", "image", "train")
    dest = Path(index["dir"])
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in dest.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "ABS"])
def test_shard_refuses_manifest_paths_that_leave_its_folder(tmp_path, path):
    import json

    from PIL import Image

    from omni_lightning.data.shards import ManifestError, shard_manifest

    base = tmp_path / "manifest"
    (base / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    if path == "ABS":
        path = str(tmp_path / "outside.png")
    line = {"query": {"type": "text", "text": "x"}, "pos": {"type": "image", "path": path}}
    (base / "m.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: pos: path .*(absolute|outside the manifest's folder)"):
        shard_manifest(base / "m.jsonl", tmp_path / "out", "image", "train", progress=False)
    assert not (tmp_path / "out").exists()
    index = shard_manifest(base / "m.jsonl", tmp_path / "out", "image", "train", progress=False, allow_outside=True)
    assert index["num_samples"] == 1


# ----------------------------------------------------------------------------------------- non-finite
def _float_wav(values: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, values.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_non_finite_audio_is_a_corrupt_sample_skipped_and_counted(tmp_path):
    from omni_lightning.data.shards import SkipCounter, iter_samples, write_shards

    samples = []
    for i in range(4):
        wav = np.sin(np.arange(1600) / 10.0)
        if i == 2:
            wav[100] = np.nan
        samples.append({"task": "t", "modality": "audio", "instruction": "", "query": {"type": "text", "text": str(i)},
                        "pos": {"type": "audio", "data": _float_wav(wav), "ext": "wav"}})
    write_shards(samples, tmp_path, "audio", "train")
    skips = SkipCounter()
    got = list(iter_samples(tmp_path / "audio/train", handler_skips=skips))
    assert [s["key"] for s in got] == ["00000000", "00000001", "00000003"]
    assert skips.count == 1 and skips.per_reason == {"non-finite media": 1}
    assert "00000002" in skips.reasons[0] and "NaN or inf" in skips.reasons[0]


def test_non_finite_video_array_is_rejected():
    from omni_lightning.data.schema import SchemaError, decode_item

    buf = io.BytesIO()
    np.save(buf, np.full((2, 4, 4, 3), np.inf, np.float32))
    with pytest.raises(SchemaError, match="non-finite|uint8"):
        decode_item({"type": "video", "file": "pos.npy"}, {"pos.npy": buf.getvalue()}, "s.tar", "k", "pos")


def test_a_non_finite_loss_stops_the_run_naming_phase_step_and_samples(tiny_model_dir, demo_root, tmp_path):
    from omni_lightning.app.cli import main
    from omni_lightning.modules.base import NonFiniteError

    out = tmp_path / "image"
    args = fit_args(IMAGE, tiny_model_dir, demo_root, out, ["--model.init_args.optimizer.init_args.lr", "1e12"])
    with pytest.raises(NonFiniteError) as err:
        main(args)
    msg = str(err.value)
    assert msg.startswith("specialist:") and "global step" in msg
    assert "sample keys ['" in msg  # the batch's samples, by key
    assert not out.exists()  # nothing exported


def test_a_non_finite_gradient_stops_the_run_before_the_step(tiny_model_dir):
    from omni_lightning.modules.base import NonFiniteError
    from omni_lightning.modules.specialist import SpecialistModule

    module = SpecialistModule(modality="image", model=str(tiny_model_dir), train_parts=["projector"])
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=7)
    module._batch_keys = ["00000003", "00000011"]
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for _, p in trainable:
        p.grad = torch.zeros_like(p)
    module.on_before_optimizer_step(None)  # finite: nothing happens
    trainable[1][1].grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"specialist: non-finite gradients in 1 parameter\(s\) .*"
                                             rf"{trainable[1][0]}.* global step 7 .*'00000003', '00000011'"):
        module.on_before_optimizer_step(None)


# ----------------------------------------------------------------------------------------- skipped samples
def test_a_phase_that_skips_too_much_stops_with_the_counts_per_reason(tiny_model_dir, demo_root, tmp_path):
    import shutil
    import tarfile

    from omni_lightning.app.cli import main
    from omni_lightning.data.datamodule import TooManySkips

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for shard in sorted((root / "image/train").glob("*.tar")):
        with tarfile.open(shard) as tf:
            names = [m.name for m in tf.getmembers() if m.name.endswith(".pos.png")]
        for name in names[1::4]:  # a quarter of the samples (not the first: check_shards reads it at start-up)
            corrupt_member(shard, name)
    out = tmp_path / "image"
    with pytest.raises(TooManySkips, match=r"samples read .* above data.init_args.max_skip_fraction=0.05 "
                                            r"\(by reason: undecodable media: \d+\)"):
        main(fit_args(IMAGE, tiny_model_dir, root, out))
    assert not out.exists()
    # accepted when the user says so
    main(fit_args(IMAGE, tiny_model_dir, root, out, ["--data.init_args.max_skip_fraction", "0.5"]))
    assert out.exists()


# ----------------------------------------------------------------------------------------- checkpoints
def _boring_fit(tmp_path, callbacks, steps=2):
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(default_root_dir=tmp_path, max_steps=steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks)
    trainer.fit(BoringModel())
    return trainer


def test_checkpoints_are_written_in_their_folder_and_renamed(tmp_path, monkeypatch):
    """Every checkpoint is staged in the destination folder (a rename across file systems is a copy that a kill
    leaves truncated), and periodic saving keeps this run's newest two."""
    import shutil

    from omni_lightning.callbacks import Preemption

    staging = tmp_path / "tmpdir-elsewhere"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr("tempfile.tempdir", None)
    moves = []
    for mod, name in ((os, "replace"), (os, "rename"), (shutil, "move")):
        real = getattr(mod, name)

        def record(src, dst, *a, _real=real, **k):
            moves.append((Path(src), Path(dst)))
            return _real(src, dst, *a, **k)

        monkeypatch.setattr(mod, name, record)
    root = tmp_path / "root"
    _boring_fit(root, [Preemption(every_n_steps=1, keep_checkpoints=True)], steps=3)
    into_root = [(s, d) for s, d in moves if d.parent == root and d.name.startswith("hpc_ckpt_")]
    assert len(into_root) == 3
    assert all(s.parent == root for s, _ in into_root), into_root
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_does_not_load(tmp_path):
    from omni_lightning.callbacks.preemption import AtomicCheckpointIO, newest_loadable

    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    io_.save_checkpoint({"global_step": 2}, tmp_path / "hpc_ckpt_2.ckpt")
    data = (tmp_path / "hpc_ckpt_2.ckpt").read_bytes()
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match=r"hpc_ckpt_2.ckpt does not load .*resuming from the previous one, "
                                         r".*hpc_ckpt_1.ckpt"):
        assert io_.load_checkpoint(tmp_path / "hpc_ckpt_2.ckpt")["global_step"] == 1
    assert newest_loadable([tmp_path]) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no checkpoint to resume from loads"):
        io_.load_checkpoint(tmp_path / "hpc_ckpt_2.ckpt")


def test_teardown_deletes_only_the_checkpoints_of_its_own_run(tmp_path):
    from omni_lightning.callbacks import Preemption

    root = tmp_path / "root"
    root.mkdir()
    other = root / "hpc_ckpt_7.ckpt"  # a concurrent run's, sharing default_root_dir
    other.write_bytes(b"another run's checkpoint")
    _boring_fit(root, [Preemption(every_n_steps=1)], steps=2)
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_7.ckpt"]
    assert other.read_bytes() == b"another run's checkpoint"


class _FakeStrategy:
    root_device = torch.device("cpu")


def _fake_trainer(tmp_path, saved):
    return SimpleNamespace(world_size=1, received_sigterm=False, strategy=_FakeStrategy(), global_step=5,
                           is_global_zero=True, default_root_dir=str(tmp_path), loggers=[], sanity_checking=False,
                           state=SimpleNamespace(fn="fit"), save_checkpoint=lambda p: saved.append(Path(p)))


def test_requeue_signal_during_validation_is_honoured_when_it_ends(tmp_path, monkeypatch):
    from omni_lightning.callbacks.preemption import Preempted, Preemption

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    saved = []
    cb = Preemption()
    cb._requeue_signal = int(signal.SIGUSR1)
    cb._on_requeue_signal(int(signal.SIGUSR1), None)  # arrives while validation runs
    with pytest.raises(Preempted) as stop:
        cb.on_validation_end(_fake_trainer(tmp_path, saved), None)
    assert stop.value.code == 128 + int(signal.SIGUSR1)
    assert saved == [tmp_path / "hpc_ckpt_1.ckpt"] and calls == [["scontrol", "requeue", "42"]]


def test_requeue_signal_before_the_export_is_honoured_when_training_ends(tmp_path, monkeypatch):
    from omni_lightning.callbacks.preemption import Preempted, Preemption

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(subprocess, "call", lambda cmd: 0)
    saved = []
    cb = Preemption()
    cb._requeue_signal = int(signal.SIGUSR1)
    cb._on_requeue_signal(int(signal.SIGUSR1), None)
    with pytest.raises(Preempted):
        cb.on_train_end(_fake_trainer(tmp_path, saved), None)
    assert saved == [tmp_path / "hpc_ckpt_1.ckpt"]


def test_a_failed_scontrol_requeue_fails_the_job_loudly(tmp_path, monkeypatch):
    from omni_lightning.callbacks.preemption import Preemption, RequeueFailed

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(subprocess, "call", lambda cmd: 1)
    saved = []
    cb = Preemption()
    cb._requeue_signal = int(signal.SIGUSR1)
    cb._on_requeue_signal(int(signal.SIGUSR1), None)
    with pytest.raises(RequeueFailed, match=r"saved .*hpc_ckpt_1.ckpt, but `scontrol requeue 42` failed \(exit 1\)"):
        cb.on_train_batch_end(_fake_trainer(tmp_path, saved), None, None, None, 0)


# ----------------------------------------------------------------------------------------- GradCache precision
def _one_sgd_step(model_dir, data_root, precision, chunk):
    from lightning.pytorch import Trainer

    from omni_lightning.data.datamodule import OmniDataModule
    from omni_lightning.modules.specialist import SpecialistModule

    torch.manual_seed(0)
    module = SpecialistModule(modality="image", model=str(model_dir), lora=None, train_parts=["projector", "language_model"],
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), grad_cache_chunk=chunk)
    dm = OmniDataModule(data_root=str(data_root), modalities=["image"], model=str(model_dir), batch_size=8,
                        steps_per_epoch=1, val_batches=1, chunk_size=chunk, num_workers=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    kw = {"precision": precision}
    if precision == "16-mixed":  # a small loss scale: a scale applied twice shows as a 16x update, not an overflow
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))]}
    Trainer(max_steps=1, **kw, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            callbacks=[]).fit(module, datamodule=dm)
    return torch.cat([(p.detach().float() - before[n].float()).flatten()
                      for n, p in module.named_parameters() if n in before])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_grad_cache_and_plain_updates_are_equal_under_every_cpu_precision(tiny_model_dir, demo_root, precision):
    plain = _one_sgd_step(tiny_model_dir, demo_root, precision, None)
    cached = _one_sgd_step(tiny_model_dir, demo_root, precision, 4)
    assert plain.norm() > 0
    ratio = (cached.norm() / plain.norm()).item()
    assert ratio == pytest.approx(1.0, abs=0.05), f"GradCache/plain update ratio {ratio:.3f} at {precision}"
    assert torch.nn.functional.cosine_similarity(plain, cached, dim=0) > 0.99
