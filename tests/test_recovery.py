"""Projector recovery: the freeze callback, the recovery phase, the drift monitor, DDP with frozen parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import fit_args
from omni_lightning.callbacks import FreezeBackbone, ProjectorDrift

from omni_lightning.app.cli import main
from omni_lightning.data.datamodule import OmniDataModule
from omni_lightning.evaluation.drift import load_pairs, measure_drift, sliced_w1
from omni_lightning.model import OmniEmbedder, OmniProcessor
from omni_lightning.model.omni import load_safetensors_dir
from omni_lightning.modules import LossSettings, RecoveryModule

REPO = Path(__file__).resolve().parents[1]
RECOVER = REPO / "configs" / "recover.yaml"


def recover_args(model_dir, data_root, out, extra=()) -> list[str]:
    return fit_args(RECOVER, model_dir, data_root, out, extra)


def test_recover_config_leaves_everything_but_the_projector_bit_identical(tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "recovered"
    main(recover_args(tiny_model_dir, demo_root, out))
    before, after = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    assert before.keys() == after.keys()
    projector = [k for k in before if k.startswith("projector.")]
    assert len(projector) == 4  # fc1/fc2 weight and bias
    for k in before:
        if k.startswith("projector."):
            assert not torch.equal(before[k], after[k]), f"{k} did not change"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed"
            assert before[k].dtype == after[k].dtype
    history = json.loads((out / "omni_config.json").read_text())["history"]
    assert history[-1]["step"] == "recover" and history[-1]["train_parts"] == ["projector"]


class ModeChecker(pl.Callback):
    """Records, at every train and validation batch, which frozen modules were in train mode."""

    def __init__(self, parts):
        self.parts, self.violations, self.batches = parts, [], 0

    def _check(self, pl_module, where):
        self.batches += 1
        for part in self.parts:
            for name, m in pl_module.embedder.part(part).named_modules():
                if m.training:
                    self.violations.append((where, part, name))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(pl_module, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._check(pl_module, "val")


def _recovery_trainer(tmp_path, callbacks, steps=3):
    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                      num_sanity_val_steps=1)


def test_frozen_parts_stay_in_eval_mode_and_only_projector_is_optimized(tiny_model_dir, demo_root, tmp_path):
    module = RecoveryModule(model=str(tiny_model_dir), loss=LossSettings(temperature=0.05))
    data = OmniDataModule(str(demo_root), ["audio"], model=str(tiny_model_dir), batch_size=8, steps_per_epoch=3,
                          val_batches=1)
    freeze = FreezeBackbone()
    checker = ModeChecker(["language_model", "vision_encoder", "audio_encoder"])
    trainer = _recovery_trainer(tmp_path, [freeze, checker])
    trainer.fit(module, data)
    assert checker.batches >= 3 + 1 and checker.violations == []
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    projector = {id(p) for p in module.embedder.projector.parameters()}
    assert optimized == projector
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["projector"]
    assert freeze.counts["projector"]["frozen"] == 0 and freeze.counts["projector"]["trainable"] > 0
    assert all(freeze.counts[p]["trainable"] == 0 for p in ("language_model", "vision_encoder", "audio_encoder"))


def test_freeze_callback_errors(tiny_model_dir, demo_root, tmp_path):
    with pytest.raises(ValueError, match="unknown model part 'decoder'"):
        FreezeBackbone(frozen=["decoder"])
    with pytest.raises(ValueError, match="nothing trainable"):
        FreezeBackbone(trainable=[])
    with pytest.raises(ValueError, match="both frozen and trainable"):
        FreezeBackbone(frozen=["backbone", "projector"], trainable=["projector"])

    class NotOmni(pl.LightningModule):
        pass

    with pytest.raises(TypeError, match="embedder"):
        FreezeBackbone().freeze_before_training(NotOmni())


def test_frozen_forward_keeps_no_graph_for_frozen_parts(tiny_model_dir, demo_root):
    """With only the projector trainable, text embeddings carry no graph and the audio encoder none either."""
    model = OmniEmbedder.from_pretrained(tiny_model_dir)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    proc = OmniProcessor.from_pretrained(tiny_model_dir)
    pairs = load_pairs(demo_root, max_samples=4)
    text = model(proc([s["query"] for s in pairs], "x"))
    assert not text.requires_grad
    seen = {}
    def grab(module, args, output):
        seen["grad"] = output.last_hidden_state.requires_grad

    handle = model.audio_encoder.register_forward_hook(grab)
    audio = model(proc([s["pos"] for s in pairs], None))
    handle.remove()
    assert audio.requires_grad and seen["grad"] is False
    audio.sum().backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_drift_measures_against_direct_computation(tiny_model_dir, demo_root):
    model = OmniEmbedder.from_pretrained(tiny_model_dir).eval()
    proc = OmniProcessor.from_pretrained(tiny_model_dir)
    pairs = load_pairs(demo_root, max_samples=12)
    # a reference that differs: the same model with a perturbed projector
    ref = OmniEmbedder.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref.projector.fc2.weight.add_(0.05 * torch.randn_like(ref.projector.fc2.weight))
    got = measure_drift(model, proc, pairs, ref, proc, batch_size=5)

    with torch.no_grad():
        q = torch.cat([model(proc([s["query"]], s["instruction"])) for s in pairs])
        a = torch.cat([model(proc([s["pos"]], None)) for s in pairs])
        r = torch.cat([ref(proc([s["pos"]], None)) for s in pairs])
        labels = [s["label"] for s in pairs]

        def hit(scores, k):  # brute force: is a same-label candidate among the top k?
            hits = 0
            for i, row in enumerate(scores.tolist()):
                order = sorted(range(len(row)), key=lambda j: -row[j])[:k]
                hits += any(labels[j] == labels[i] for j in order)
            return hits / len(labels)

        assert got["t2a_r1"] == pytest.approx(hit(q @ a.T, 1))
        assert got["t2a_r5"] == pytest.approx(hit(q @ a.T, 5))
        assert got["a2t_r1"] == pytest.approx(hit(a @ q.T, 1))
        assert got["ref_cosine"] == pytest.approx(float(sum((a[i] @ r[i]) for i in range(len(pairs))) / len(pairs)), abs=1e-5)
        assert got["ref_cosine"] < 0.99999

        feats, lens = proc.logmel([s["pos"]["waveform"] for s in pairs], [s["pos"]["sample_rate"] for s in pairs])
        tokens = model.projector(model.audio_encoder(
            input_features=torch.cat([feats[i, :, : int(n)] for i, n in enumerate(lens)], 1), feature_lens=lens
        ).last_hidden_state)
        rows = model.backbone.get_input_embeddings().weight[: model.config.base_vocab_size]
        ratio = tokens.norm(dim=-1).mean() / rows.norm(dim=-1).mean()
    assert got["norm_ratio"] == pytest.approx(float(ratio), rel=1e-5)


def test_sliced_w1_against_sorting():
    """Equal-size clouds: 1-D W1 is the mean absolute difference of the sorted projections."""
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(200, 6, generator=g) + 0.5, torch.randn(200, 6, generator=g) * 2
    dirs = torch.randn(6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, pr = x.double() @ dirs, ref.double() @ dirs
    expected = ((px.sort(0).values - pr.sort(0).values).abs().mean(0) / pr.std(0, unbiased=False)).mean()
    assert sliced_w1(x, ref) == pytest.approx(float(expected), rel=1e-9)
    assert sliced_w1(ref, ref) == pytest.approx(0.0, abs=1e-12)


def test_drift_monitor_logs_at_start_and_each_validation(tiny_model_dir, demo_root, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = RecoveryModule(model=str(tiny_model_dir), loss=LossSettings(temperature=0.05))
    data = OmniDataModule(str(demo_root), ["audio"], model=str(tiny_model_dir), batch_size=8, steps_per_epoch=2,
                          val_batches=1)
    drift = ProjectorDrift(max_samples=16, reference=str(tiny_model_dir))
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[FreezeBackbone(), drift])
    trainer.fit(module, data)
    assert [h["global_step"] for h in drift.history] == [0, 2, 4]
    assert drift.history[0]["ref_cosine"] == pytest.approx(1.0, abs=1e-5)  # reference = the starting model
    assert drift.history[-1]["ref_cosine"] < drift.history[0]["ref_cosine"]  # the projector moved
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("recover/drift/t2a_r1")]
    assert len(logged) == 3


def test_recovery_lowers_the_audio_loss(tiny_model_dir, demo_root, tmp_path):
    """A small fixed budget of projector-only training lowers the audio–text loss on held-out pairs."""
    from omni_lightning.losses import ContrastiveLoss

    out = tmp_path / "rec"
    main(recover_args(tiny_model_dir, demo_root, out, ["--data.init_args.batch_size", "16",
                                                       "--data.init_args.steps_per_epoch", "40",
                                                       "--trainer.limit_val_batches", "0"]))
    pairs = load_pairs(demo_root, max_samples=48)
    loss_fn = ContrastiveLoss(temperature=0.05, symmetric=True)

    def loss_of(d):
        model, proc = OmniEmbedder.from_pretrained(d).eval(), OmniProcessor.from_pretrained(d)
        with torch.no_grad():
            q = model.encode(proc, [s["query"] for s in pairs], [s["instruction"] for s in pairs])
            a = model.encode(proc, [s["pos"] for s in pairs])
        return float(loss_fn(q, a))

    before, after = loss_of(tiny_model_dir), loss_of(out)
    assert after < before - 0.05, (before, after)


def test_recovery_ddp_two_cpu_processes(tiny_model_dir, demo_root, tmp_path):
    """Frozen parameters do not break DDP (no unused-parameter error, nothing frozen synced or changed)."""
    out = tmp_path / "ddp"
    args = recover_args(tiny_model_dir, demo_root, out,
                        ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    r = subprocess.run([sys.executable, "-m", "omni_lightning", *args], capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("projector."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("projector."))


def test_drift_cli_prints_a_table(tiny_model_dir, demo_root, tmp_path):
    r = subprocess.run([sys.executable, "-m", "omni_lightning", "drift", "--model", str(tiny_model_dir),
                        "--reference", str(tiny_model_dir), "--data", str(demo_root), "--max-samples", "8",
                        "--out", str(tmp_path / "d.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| t2a_r1 |" in r.stdout.replace("| model | ", "| ")
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["tiny"]["ref_cosine"] == pytest.approx(1.0, abs=1e-5)
