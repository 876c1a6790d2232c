"""W&B: the dashboard is built from the metric catalogue, and offline runs of the phases hold every name its
panels plot (read back from the runs' files, so renaming a logged metric breaks these tests). No network."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
from conftest import fit_args
from slurm_helpers import assert_logged

from omni_lightning.app.cli import main
from omni_lightning.tracking import (
    LR_REGEX,
    SECTIONS,
    STEP_KEY,
    eval_metrics,
    examples_table,
    model_phase,
    offline_runs,
    panels,
    read_offline_run,
    run_id,
    wandb_mode,
)

REPO = Path(__file__).resolve().parents[1]


def wandb_fit_args(config: str, model, data_root, out: Path, name: str, extra=()) -> list[str]:
    """conftest's small fit, logging to W&B offline (the logger the SLURM scripts choose)."""
    args = fit_args(REPO / "configs" / config, model, data_root, out / name)
    i = args.index("--trainer.logger")
    del args[i:i + 2]
    return [*args, "--trainer.logger", "omni_lightning.loggers.OmniWandbLogger",
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.save_dir", str(out / "logs" / name),
            "--trainer.log_every_n_steps", "1", *extra]


@pytest.fixture(scope="module")
def phase_runs(tiny_model_dir, demo_root, tmp_path_factory, request):
    """Offline W&B runs of recover and rehearse fits, then an eval job over one model of every phase."""
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    for k in ("WANDB_RUN_ID", "SLURM_JOB_ID", "WANDB_RUN_GROUP"):
        mp.delenv(k, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    out = tmp_path_factory.mktemp("wandb")
    mp.setenv("WANDB_DATA_DIR", str(out / "wandb-data"))  # staged artifacts (tables and their media)
    main(wandb_fit_args("recover.yaml", tiny_model_dir, demo_root, out, "recover"))
    # the monitoring callbacks the specialist and recover configs list, where rehearse.yaml lacks them
    import yaml

    listed = {c["class_path"] for c in yaml.safe_load((REPO / "configs/rehearse.yaml").read_text())["trainer"].get(
        "callbacks") or []}
    extra = [f"--trainer.callbacks+=omni_lightning.callbacks.{c}" for c in ("Throughput", "LearningRate",
             "RetrievalExamples") if f"omni_lightning.callbacks.{c}" not in listed]
    main(wandb_fit_args("rehearse.yaml", out / "recover", demo_root, out, "rehearse", extra))
    # the eval job names each run by the phase that produced its model: θ₀ (base), recovered, final
    rc = main(["jobs", "eval", "--models", str(tiny_model_dir), str(out / "recover"), str(out / "rehearse"),
               "--data", str(demo_root), "--out", str(out / "eval"), "--wandb-dir", str(out / "logs/eval"),
               "--examples", "2", "--examples-pool", "16",
               "--modalities", "image", "audio", "--max-samples", "16", "--no-progress"])
    assert rc == 0
    return out


def test_fit_runs_hold_every_metric_of_their_sections(phase_runs):
    runs = offline_runs(phase_runs / "logs", wait=30)
    recover = [r for r in runs if r.path.is_relative_to(phase_runs / "logs/recover")]
    rehearse = [r for r in runs if r.path.is_relative_to(phase_runs / "logs/rehearse")]
    evals = [r for r in runs if r.path.is_relative_to(phase_runs / "logs/eval")]
    assert len(recover) == len(rehearse) == 1 and len(evals) == 3
    fit_panels = lambda s, mods: [p for p in panels(s, mods) if "/eval/" not in "".join(p.keys)]  # noqa: E731
    # rehearsal draws one modality per step: per-modality train losses exist for those it drew
    mix = model_history(phase_runs / "rehearse")["mix"]
    drawn = tuple(m for m, share in mix.items() if share > 0)
    assert drawn and set(mix) == {"image", "video", "document", "audio"}
    for section, run, mods in (("recover", recover[0], ("audio",)), ("rehearse", rehearse[0], drawn)):
        missing = [k for p in fit_panels(section, mods) for k in p.keys if not run.has(k)]
        assert not missing, f"{section} run lacks {missing}"
        assert all(run.has(examples_table(section, m)) for m in (mods if section == "recover" else mix))
        assert run.step_metrics.get("*") == STEP_KEY  # every metric against trainer/global_step
        assert any(re.match(LR_REGEX, k) for k in run.history_keys)  # LearningRate
    # eval panels of a phase: filled by the eval job's run of that phase's model
    assert all(rehearse[0].has(f"rehearse/mix/{m}") and rehearse[0].has(f"rehearse/val/r1/{m}") for m in mix)
    # eval panels of a phase: filled by the eval job's run of that phase's model
    assert_logged(recover + evals, "recover", ("audio",))
    assert_logged(rehearse + evals, "rehearse", tuple(m for m in ("image", "audio") if m in drawn))


def model_history(model_dir: Path) -> dict:
    return json.loads((model_dir / "omni_config.json").read_text())["history"][-1]


def test_eval_job_runs_hold_the_eval_section(phase_runs):
    evals = offline_runs(phase_runs / "logs/eval", wait=30)
    phases = {r.config["phase"] for r in evals}
    assert phases == {"base", "recover", "rehearse"}
    section = panels("eval", ("image", "audio"))
    for p in section:  # each bar plot compares the models: the phases evaluated here (+ specialist, fuse)
        present = {k.split("/")[0] for k in p.keys if any(r.has(k) for r in evals)}
        assert present == phases, (p.title, present)
    results = json.loads((phase_runs / "eval" / "recover.json").read_text())
    (recovered,) = [r for r in evals if r.config["phase"] == "recover"]
    for key, value in eval_metrics("recover", results).items():
        assert recovered.summary[key] == pytest.approx(value)
    for m, suffix in (("image", ".png"), ("audio", ".wav")):  # one table per modality, 2 queries each
        table = recovered.summary[examples_table("recover", m)]
        assert table["_type"] == "table-file" and table["nrows"] == 2 and table["ncols"] == 9
        # the table travels as an artifact with its media, staged for `wandb sync`
        (files,) = [f for f in recovered.artifacts.values() if f"{examples_table('recover', m)}.table.json" in f]
        media = [p for p in files if p.startswith("media/")]
        assert 0 < len(media) <= 2 * (1 + 3) and all(p.endswith(suffix) for p in media)  # target + top 3 (deduped)
        assert all(Path(files[p]).is_file() for p in media)


def test_dashboard_panels_come_from_the_catalogue():
    from omni_lightning.app.dashboard import build_workspace, panel_keys, spec

    ws = build_workspace("ent", "proj")
    keys = panel_keys(ws)
    assert list(keys) == ["specialist", "fuse", "recover", "rehearse", "eval", "optimizer"]
    assert set(keys) == set(SECTIONS)
    for section, names in keys.items():
        expected = [f"re:{p.regex}" if p.regex else k for p in panels(section, ("audio",) if section == "recover" else None)
                    for k in (p.keys or ("",)) if p.regex or k]
        assert names == expected, section
    view = spec(ws)  # what save() would upload, built offline
    assert view["entity"] == "ent" and view["project"] == "proj"
    text = json.dumps(view)
    assert STEP_KEY in text and "specialist/train/loss/audio" in text and "rehearse/mix/video" in text


def test_dashboard_command_dry_run_prints_without_network(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["dashboard", "--entity", "ent", "--project", "proj", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for section in SECTIONS:
        assert f"[{section}]" in printed
    assert "recover/drift/sliced_w1" in printed and "fuse/task_vector/norm/audio" in printed
    assert main(["dashboard", "--entity", "ent", "--project", "proj", "--dry-run", "--json",
                 "--sections", "recover"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in view["spec"]["section"]["panel_bank_config"]["sections"]] == ["recover"]
    # saving needs W&B's servers: refused while offline, with what to do
    assert main(["dashboard", "--entity", "ent", "--project", "proj"]) == 2
    assert "WANDB_MODE=online" in capsys.readouterr().err


def test_run_identity(monkeypatch, tmp_path):
    for k in ("WANDB_RUN_ID", "SLURM_JOB_ID", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    assert run_id() is None and wandb_mode() == "offline"  # never online by accident
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_id() == "4242" and run_id(suffix="eval-image") == "4242-eval-image"
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    assert run_id() == "mine" and run_id("explicit") == "explicit"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "onlien")
    with pytest.raises(ValueError, match="WANDB_MODE='onlien'"):
        wandb_mode()
    with pytest.raises(FileNotFoundError, match="no run-<id>.wandb"):
        read_offline_run(tmp_path)


def test_model_phase(tiny_model_dir, tmp_path):
    assert model_phase(tiny_model_dir) == "base"
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "omni_config.json").read_text())
    cfg["history"].append({"step": "recover"})
    (d / "omni_config.json").write_text(json.dumps(cfg))
    assert model_phase(d) == "recover"


def test_wandb_offline_sync_triggers_from_rank_zero_only(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger
    from omni_lightning.callbacks import WandbOfflineSync

    calls = []

    class Hook:  # wandb-osh's TriggerWandbSyncHook: writes a command file naming the run folder
        def __init__(self, communication_dir=None):
            self.communication_dir = communication_dir

        def __call__(self, logdir=None):
            calls.append((self.communication_dir, Path(logdir)))

    pkg, hooks = types.ModuleType("wandb_osh"), types.ModuleType("wandb_osh.hooks")
    hooks.TriggerWandbSyncHook = Hook
    monkeypatch.setitem(sys.modules, "wandb_osh", pkg)
    monkeypatch.setitem(sys.modules, "wandb_osh.hooks", hooks)
    cb = WandbOfflineSync(communication_dir=str(tmp_path / "osh"))
    logger = WandbLogger.__new__(WandbLogger)
    logger._experiment = types.SimpleNamespace(dir=str(tmp_path / "offline-run-x" / "files"))
    for rank_zero in (False, True):
        trainer = types.SimpleNamespace(is_global_zero=rank_zero, sanity_checking=False, loggers=[logger])
        cb.on_validation_epoch_end(trainer, None)
    trainer.sanity_checking = True
    cb.on_validation_epoch_end(trainer, None)  # the sanity check does not count
    assert calls == [(str(tmp_path / "osh"), tmp_path / "offline-run-x")] and cb.triggered == 1
    monkeypatch.setitem(sys.modules, "wandb_osh.hooks", None)  # not installed: a clear error
    with pytest.raises(ImportError, match="pip install wandb-osh"):
        WandbOfflineSync()
