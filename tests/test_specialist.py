"""The specialist phase through the real CLI and configs, LoRA export, GradCache in the loop, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fit_args

from omni_lightning.app.cli import main
from omni_lightning.model import OmniConfig, OmniEmbedder, OmniProcessor
from omni_lightning.model.omni import load_safetensors_dir

REPO = Path(__file__).resolve().parents[1]
SPECIALISTS = ("image", "video", "document", "audio")


@pytest.mark.parametrize("modality", SPECIALISTS)
def test_specialist_config_runs_and_exports(modality, tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "spec"
    main(fit_args(REPO / "configs" / "specialist" / f"{modality}.yaml", tiny_model_dir, demo_root, out))
    cfg = OmniConfig.load(out)
    assert cfg.history[-1]["step"] == "specialist" and cfg.history[-1]["modality"] == modality
    assert cfg.history[-1]["global_step"] == 3

    base, trained = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    assert base.keys() == trained.keys()  # LoRA merged: a dense directory with the base's tensors
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    trained_prefixes = {
        "image": ("backbone.",), "video": ("backbone.",), "document": ("backbone.",),
        "audio": ("backbone.language_model.", "audio_encoder.", "projector."),
    }[modality]
    assert changed, "training changed nothing"
    assert all(k.startswith(trained_prefixes) for k in changed), sorted(changed)[:5]
    if modality == "audio":
        assert any(k.startswith("projector.") for k in changed)
        assert not any(k.startswith("backbone.visual.") for k in changed)

    model, proc = OmniEmbedder.from_pretrained(out).eval(), OmniProcessor.from_pretrained(out)
    from omni_lightning.data.shards import iter_samples, split_dir

    samples = [s for _, s in zip(range(4), iter_samples(str(split_dir(demo_root, modality, "eval"))))]
    with torch.no_grad():
        emb = model.encode(proc, [s["pos"] for s in samples])
    assert emb.shape == (4, model.embedding_dim) and torch.isfinite(emb).all()


def test_lora_export_equals_wrapped_model(tiny_model_dir, tmp_path):
    from conftest import assert_lora_export_equals_wrapped

    from omni_lightning.modules import LoraSettings, SpecialistModule

    module = SpecialistModule(modality="image", model=str(tiny_model_dir), lora=LoraSettings(parts=["all"], r=4))
    assert_lora_export_equals_wrapped(module, tiny_model_dir, tmp_path / "merged")


def test_parts_configuration_errors(tiny_model_dir):
    from omni_lightning.modules import LoraSettings, SpecialistModule

    with pytest.raises(ValueError, match="unknown model part 'decoder'"):
        SpecialistModule(modality="image", model=str(tiny_model_dir), train_parts=["decoder"])
    with pytest.raises(ValueError, match="nothing is trainable"):
        SpecialistModule(modality="image", model=str(tiny_model_dir))
    with pytest.raises(ValueError, match="both in lora.parts and train_parts"):
        SpecialistModule(modality="image", model=str(tiny_model_dir), train_parts=["projector"],
                         lora=LoraSettings(parts=["audio"]))
    with pytest.raises(ValueError, match="modality"):
        SpecialistModule(modality="smell", model=str(tiny_model_dir), train_parts=["projector"])


def _fit_weights(tiny_model_dir, demo_root, tmp_path, grad_cache_chunk, steps=2):
    """Two SGD steps of the audio specialist (full projector + LoRA) with or without GradCache."""
    import lightning.pytorch as pl

    from omni_lightning.data.datamodule import OmniDataModule
    from omni_lightning.modules import LoraSettings, LossSettings, SpecialistModule

    pl.seed_everything(0)
    module = SpecialistModule(
        modality="audio", model=str(tiny_model_dir), train_parts=["projector"],
        lora=LoraSettings(parts=["language_model"], r=4), loss=LossSettings(temperature=0.05),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), grad_cache_chunk=grad_cache_chunk,
    )
    data = OmniDataModule(str(demo_root), ["audio"], model=str(tiny_model_dir), batch_size=12, steps_per_epoch=2,
                          val_batches=1, num_negatives=1, chunk_size=grad_cache_chunk, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    if steps:
        trainer.fit(module, data)
    return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}


def test_grad_cache_training_matches_full_batch(tiny_model_dir, demo_root, tmp_path):
    start = _fit_weights(tiny_model_dir, demo_root, tmp_path / "0", None, steps=0)
    plain = _fit_weights(tiny_model_dir, demo_root, tmp_path / "a", None)
    cached = _fit_weights(tiny_model_dir, demo_root, tmp_path / "b", 5)  # uneven chunks: 5 + 5 + 2
    assert any("projector" in k for k in plain) and any("lora_" in k for k in plain)
    for k in plain:
        update, cached_update = plain[k] - start[k], cached[k] - start[k]
        assert update.norm() > 0, f"{k} did not train"
        # same update up to float32 reordering (chunks pad and multiply in other shapes)
        assert (cached_update - update).norm() <= 1e-3 * update.norm(), k


def test_specialist_ddp_two_cpu_processes(tiny_model_dir, demo_root, tmp_path):
    """DDP with frozen parts, LoRA and cross-device negatives on 2 CPU ranks (gloo) runs and exports."""
    out = tmp_path / "ddp"
    args = fit_args(REPO / "configs" / "specialist" / "audio.yaml", tiny_model_dir, demo_root, out,
                     ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "omni_lightning", *args], capture_output=True, text=True,
                       timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert OmniConfig.load(out).history[-1]["global_step"] == 3


def test_sharded_strategies_are_refused_when_the_fit_exports(tiny_model_dir):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        SingleDeviceStrategy,
    )

    from omni_lightning.modules import SpecialistModule
    from omni_lightning.modules.base import check_export_strategy

    with pytest.raises(ValueError, match="FSDPStrategy: the export to out needs the full, unsharded weights"):
        check_export_strategy(FSDPStrategy(), "out")
    check_export_strategy(FSDPStrategy(), None)  # no export: nothing to refuse
    check_export_strategy(DDPStrategy(), "out")
    check_export_strategy(SingleDeviceStrategy("cpu"), "out")
    # every phase runs the check when fit starts (Lightning cannot build FSDP on a CPU: a stand-in trainer)
    module = SpecialistModule(modality="image", model=str(tiny_model_dir), export_dir="out", train_parts=["projector"])
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None)
    with pytest.raises(ValueError, match="FSDPStrategy: the export to out"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), datamodule=None)
    module.on_fit_start()
