"""The rehearsal phase: config run and export, module defaults, LoRA merge, logged mix, exact mid-epoch resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import assert_lora_export_equals_wrapped, demo_items, fit_args

from omni_lightning.app.cli import main
from omni_lightning.model import OmniConfig, OmniEmbedder, OmniProcessor
from omni_lightning.model.omni import load_safetensors_dir

REPO = Path(__file__).resolve().parents[1]
MODS = ["image", "video", "document", "audio"]


def test_rehearse_config_runs_and_exports(tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "final"
    main(fit_args(REPO / "configs" / "rehearse.yaml", tiny_model_dir, demo_root, out))
    cfg = OmniConfig.load(out)
    rec = cfg.history[-1]
    assert rec["step"] == "rehearse" and rec["global_step"] == 3
    assert rec["weights"] == {m: 0.25 for m in MODS} and rec["mixed_batches"] is False
    assert sum(rec["mix"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(v * 3 == pytest.approx(round(v * 3), abs=1e-5) for v in rec["mix"].values())  # shares of 3 batches

    base, trained = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    assert base.keys() == trained.keys()  # LoRA merged: dense, the same tensors
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("backbone.") for k in changed), sorted(changed)[:5]
    assert not any(k.startswith(("audio_encoder.", "projector.")) for k in changed)  # frozen by default

    model, proc = OmniEmbedder.from_pretrained(out).eval(), OmniProcessor.from_pretrained(out)
    with torch.no_grad():
        emb = model.encode(proc, demo_items())
    assert emb.shape == (len(demo_items()), model.embedding_dim) and torch.isfinite(emb).all()


def test_rehearsal_defaults_and_parts(tiny_model_dir):
    from omni_lightning.modules import RehearsalModule

    module = RehearsalModule(model=str(tiny_model_dir))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    prefixes = {n.split(".lora_")[0].replace("base_model.model.", "").split(".")[1] for n in trainable}
    assert prefixes == {"language_model", "visual"}  # the backbone group: LLM + vision encoder
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-5  # the paper's value
    with_projector = RehearsalModule(model=str(tiny_model_dir), train_parts=["projector"])
    assert any(n.startswith("base_model.model.projector.") and p.requires_grad
               for n, p in with_projector.model.named_parameters())


def test_lora_merged_export_equals_wrapped_model(tiny_model_dir, tmp_path):
    from omni_lightning.modules import RehearsalModule

    module = RehearsalModule(model=str(tiny_model_dir))
    assert_lora_export_equals_wrapped(module, tiny_model_dir, tmp_path / "merged")


# ------------------------------------------------------------------------------------------------ exact resume


def _fit(model_dir, data_root, tmp, *, num_workers, mixed, mods=MODS, steps=4, epochs=2, max_steps=-1, save_at=None,
         ckpt=None, logger=False):
    """Rehearsal on the tiny model (batch 4); records (global step, modality, samples) per trained batch."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from omni_lightning.data.datamodule import OmniDataModule
    from omni_lightning.modules import LoraSettings, LossSettings, RehearsalModule

    class Record(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            parts = batch.get("parts", [batch])
            self.seen.append((trainer.global_step, batch["modality"],
                              tuple((p["modality"], k) for p in parts for k in p["keys"])))

    pl.seed_everything(0)
    module = RehearsalModule(model=str(model_dir), lora=LoraSettings(parts=["backbone"], r=4),
                             loss=LossSettings(temperature=0.05),
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = OmniDataModule(str(data_root), mods, model=str(model_dir), batch_size=4, steps_per_epoch=steps,
                          val_batches=1, num_workers=num_workers, shuffle_buffer=8, mixed_batches=mixed)
    record = Record()
    callbacks = [record] + ([ModelCheckpoint(dirpath=tmp, every_n_train_steps=save_at, save_top_k=-1)]
                            if save_at else [])
    trainer = pl.Trainer(max_epochs=epochs, max_steps=max_steps, enable_checkpointing=bool(save_at),
                         logger=CSVLogger(tmp, name="log") if logger else False, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp, callbacks=callbacks)
    # our own checkpoint; its hyper-parameters hold a LoraSettings and a lambda, hence weights_only=False
    trainer.fit(module, data, ckpt_path=ckpt, weights_only=False)
    weights = {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}
    return weights, record.seen, trainer, data


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("num_workers,steps,epochs,stop,mixed", [(0, 4, 2, 6, False), (2, 6, 1, 3, True)],
                         ids=["in-process", "2-workers-mixed"])
def test_mid_epoch_resume_is_exact(tiny_model_dir, demo_root, tmp_path, num_workers, steps, epochs, stop, mixed):
    """Uninterrupted vs stopped at `stop` (mid-epoch; with 2 workers at an odd offset, so lanes swap workers) and
    resumed from the checkpoint: the same batches in the same order and bitwise-equal weights."""
    mods = ["image", "audio"] if mixed else MODS  # mixed: 2 sub-batches of 2 per step
    kw = dict(num_workers=num_workers, mixed=mixed, mods=mods, steps=steps, epochs=epochs)
    total = steps * epochs
    full, seen_full, trainer, data = _fit(tiny_model_dir, demo_root, tmp_path / "full", logger=not mixed, **kw)
    _, seen_a, _, _ = _fit(tiny_model_dir, demo_root, tmp_path / "a", max_steps=stop, save_at=stop, **kw)
    ckpt = next((tmp_path / "a").glob(f"*step={stop}.ckpt"))
    state = torch.load(ckpt, weights_only=False)["OmniDataModule"]["train_stream"]
    assert (state["epoch"], state["next"]) == divmod(stop, steps) and state["next"] > 0  # stopped mid-epoch
    resumed, seen_b, _, _ = _fit(tiny_model_dir, demo_root, tmp_path / "b", ckpt=str(ckpt), **kw)

    assert len(seen_full) == total and [s[0] for s in seen_a + seen_b] == list(range(total))
    assert [s[1:] for s in seen_a + seen_b] == [s[1:] for s in seen_full]  # same modalities, samples, order
    assert full.keys() == resumed.keys() and len(full) > 0
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # bitwise on CPU

    if mixed:
        assert all(s[1] == "mixed" and {m for m, _ in s[2]} == {"image", "audio"} for s in seen_full)
    else:  # the logged mix is what training consumed
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        last = [r for r in rows if r.get("rehearse/mix/image")][-1]
        counts = {m: sum(s[1] == m for s in seen_full) for m in MODS}
        for m in MODS:
            assert float(last[f"rehearse/mix/{m}"]) == pytest.approx(counts[m] / total)
        assert data.mix == {m: counts[m] / total for m in MODS}


def _rehearse_ddp(tiny_model_dir, demo_root, out, strategy, mixed):
    import os
    import subprocess
    import sys

    args = fit_args(REPO / "configs" / "rehearse.yaml", tiny_model_dir, demo_root, out,
                    ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy,
                     "--data.init_args.mixed_batches", str(mixed).lower(), "--data.init_args.steps_per_epoch", "4",
                     "--data.init_args.seed", "5"])  # seed 5: the 4 per-modality steps are image, audio, video, document
    return subprocess.run([sys.executable, "-m", "omni_lightning", *args], capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=out.parent)


# per-modality batches need unused-parameter detection (an audio step leaves the vision encoder's LoRA idle);
# mixed batches of 8 hold every modality at every step, so plain DDP is enough
@pytest.mark.parametrize("strategy,mixed", [("ddp_find_unused_parameters_true", False), ("ddp", True)],
                         ids=["per-modality", "mixed"])
def test_rehearsal_ddp_two_cpu_processes(tiny_model_dir, demo_root, tmp_path, strategy, mixed):
    """Rehearsal under DDP on 2 CPU ranks (gloo): LoRA on the backbone, cross-device negatives, and either steps
    of one modality each (the vision encoder idle on the audio step) or mixed batches whose per-modality
    sub-batches meet across ranks. It runs, trains only the backbone, and records the schedule's mix."""
    from omni_lightning.data.balanced_sampler import BalancedSchedule

    out = tmp_path / "ddp"
    r = _rehearse_ddp(tiny_model_dir, demo_root, out, strategy, mixed)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = OmniConfig.load(out).history[-1]
    assert rec["step"] == "rehearse" and rec["global_step"] == 4 and rec["mixed_batches"] is mixed
    base, trained = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("backbone.") for k in changed), sorted(changed)[:5]
    assert any(".visual." in k for k in changed) and any(".language_model." in k for k in changed)
    sched = BalancedSchedule(MODS, {m: 0.25 for m in MODS}, 8, 5, mixed)
    if mixed:  # 2 of each per step on each rank
        assert all(sched.composition(s) == {m: 2 for m in MODS} for s in range(4))
        assert rec["mix"] == pytest.approx({m: 0.25 for m in MODS})
    else:  # the recorded mix is the schedule's, which every rank shares
        kinds = [sched.modality(s) for s in range(4)]
        assert sorted(kinds) == sorted(MODS)  # the audio step is in there
        assert rec["mix"] == pytest.approx({m: kinds.count(m) / 4 for m in MODS})


def test_plain_ddp_with_idle_parts_is_refused_before_the_first_step(tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "ddp"
    r = _rehearse_ddp(tiny_model_dir, demo_root, out, "ddp", False)
    assert r.returncode != 0 and not out.exists()
    msg = "a step of audio leaves vision_encoder unused"
    assert msg in r.stderr and "ddp_find_unused_parameters_true" in r.stderr, r.stderr[-3000:]
    assert "It looks like your LightningModule has parameters that were not used" not in r.stderr


def test_sparsest_steps_and_idle_parts(tiny_model_dir):
    from omni_lightning.data.balanced_sampler import BalancedSchedule
    from omni_lightning.modules import RehearsalModule

    probs = {m: 0.25 for m in MODS}
    assert BalancedSchedule(MODS, probs, 8, 0, False).sparsest_steps() == [frozenset([m]) for m in MODS]
    assert BalancedSchedule(MODS, probs, 8, 0, True).sparsest_steps() == [frozenset(MODS)]
    # batch 6: 1.5 per modality, so each has at least one sample
    assert BalancedSchedule(MODS, probs, 6, 0, True).sparsest_steps() == [frozenset(MODS)]
    # batch 3: no modality is sure of a sample; a step may hold any one alone
    skew = {"image": 0.7, "video": 0.1, "document": 0.1, "audio": 0.1}
    assert BalancedSchedule(MODS, skew, 3, 0, True).sparsest_steps() == [frozenset(["image"])]
    assert BalancedSchedule(MODS, probs, 3, 0, True).sparsest_steps() == [frozenset([m]) for m in MODS]
    # brute force: the claimed sparsest set is contained in every step's composition
    for sched in (BalancedSchedule(MODS, skew, 3, 0, True), BalancedSchedule(MODS, probs, 6, 0, True)):
        (always,) = sched.sparsest_steps()
        assert all(always <= set(sched.composition(s)) for s in range(500))

    emb = RehearsalModule(model=str(tiny_model_dir)).embedder  # LoRA on the language model and vision encoder
    assert emb.idle_parts({"audio"}) == ["vision_encoder"] and emb.idle_parts({"image"}) == []
    assert emb.idle_parts({"audio", "video"}) == []

