"""The one-command pipeline: a miniature run end to end, the report, skip / redo logic, a failing stage."""

from __future__ import annotations

import json

import pytest

from omni_lightning.app.pipeline import Pipeline, PipelineError, load_pipeline_config
from omni_lightning.app.pipeline import run_pipeline as main

MODELS = ["base", "image specialist", "video specialist", "document specialist", "audio specialist", "fused",
          "recovered", "final (rehearsed)", "joint: image+video+document", "joint: image+video+document+audio"]
COLUMNS = ["image", "video", "document", "audio", "text"]


def mini_args(out) -> list[str]:
    """configs/pipeline.yaml cut down to a few CPU steps per stage, a small corpus and a 2 × 2 α grid."""
    from omni_lightning.app.pipeline import config_path

    grid = out.parent / "grid.yaml"
    grid.write_text("axes: {audio: [0.5, 1.0], vision: [0.3, 0.6]}\nmax_samples: 8\nbatch_size: 16\n")
    return ["--config", str(config_path("pipeline.yaml")), "--out", str(out),
            "--data.n_train", "48", "--data.n_eval", "24", "--data.n_diag", "16", "--data.pretrain_n_train", "48",
            "--data.pretrain_n_eval", "24", "--fuse.grid", str(grid),
            "--budget.steps_per_epoch", "2", "--budget.max_epochs", "1", "--budget.batch_size", "8",
            "--budget.val_batches", "1", "--budget.num_workers", "0", "--budget.logger", "false",
            "--eval.batch_size", "16", "--eval.pool_size", "8", "--eval.max_samples", "16"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(mini_args(out)) == 0
    return out


@pytest.mark.timeout(1500)  # the module's fixture runs the whole miniature pipeline inside the first test
def test_miniature_pipeline_writes_full_report(mini):
    report = json.loads((mini / "report.json").read_text())
    assert list(report["results"]) == MODELS
    for name in MODELS:
        assert set(report["results"][name]) == set(COLUMNS), name
        for m in COLUMNS:
            assert 0.0 <= report["results"][name][m]["q2c_hit1"] <= 1.0
    md = (mini / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in md
    assert "| model | image | video | document | audio | text |" in md
    assert (mini / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # recovery trained only the projector: the report checked it tensor by tensor
    ident = report["backbone_after_recovery"]
    assert ident["identical"] is True and ident["projector_tensors_changed"] > 0
    # the pattern checks carry numbers from the results
    drift = [c for c in report["pattern"] if c["check"].startswith("Projector Drift")][0]
    spec = report["results"]["audio specialist"]["audio"]["q2c_hit1"]
    fused = report["results"]["fused"]["audio"]["q2c_hit1"]
    assert drift["ok"] == (spec - fused >= 0.2) and f"{spec:.3f}" in drift["measured"]
    assert set(report["drift"]) == {"audio specialist", "fused", "recovered", "final (rehearsed)"}
    # every stage left a record; the chain starts from the pretrained base
    stages = {p.stem for p in (mini / ".pipeline").glob("*.json")}
    assert {"init", "pretrain-data", "pretrain", "data", "joint-vision", "joint-all", "fuse", "grid", "recover",
            "rehearse"} <= stages
    from omni_lightning.model.config import OmniConfig

    assert [h["step"] for h in OmniConfig.load(mini / "base").history][-1] == "pretrain"
    # the joint baselines start from θ₀ and train the specialists' steps of their modalities combined (2 each)
    for name, steps in (("vision", 6), ("all", 8)):
        rec = OmniConfig.load(mini / "joint" / name).history[-1]
        assert rec["step"] == "joint" and rec["from"] == str(mini / "base") and rec["global_step"] == steps
    # the α grid: every setting of the 2 × 2 grid scored on the diagnostic split, the best named by the rule
    grid = report["grid"]
    assert grid["split"] == "diag" and len(grid["settings"]) == 4
    assert {(s["alpha"]["audio"], s["alpha"]["image"]) for s in grid["settings"]} == {(0.5, 0.3), (1.0, 0.3),
                                                                                      (0.5, 0.6), (1.0, 0.6)}
    assert all(s["alpha"]["video"] == s["alpha"]["document"] == s["alpha"]["image"] for s in grid["settings"])
    assert grid["best"]["score"] == max(s["score"] for s in grid["settings"])
    assert "## α grid" in md and (mini / "grid" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert any(c["check"].startswith("the visual task vectors overlap") for c in report["pattern"])


def test_rerun_skips_everything_and_force_redoes_downstream(mini, capsys):
    cfg, _ = load_pipeline_config(mini_args(mini))
    pipe = Pipeline(cfg)
    assert all(pipe.is_done(s) for s in pipe.stages)
    capsys.readouterr()
    before = json.loads((mini / "report.json").read_text())
    pipe.run()
    assert pipe.ran == []
    # nothing changed, so no model is loaded again: eval results and the drift table come from the cache
    assert "[eval]" not in capsys.readouterr().out
    after = json.loads((mini / "report.json").read_text())
    assert after["results"] == before["results"] and after["drift"] == before["drift"]
    cfg, force = load_pipeline_config(mini_args(mini) + ["--force", "fuse"])
    pipe = Pipeline(cfg, force)
    pipe.run()
    # fuse is redone, and so is everything made from its output; the grid, baselines and specialists are not
    assert pipe.ran == ["fuse", "recover", "rehearse"]
    out = capsys.readouterr().out
    assert "[skip] specialist-audio" in out and "[skip] grid" in out and "[skip] joint-all" in out
    # the redone models are evaluated again, the untouched ones are not; the drift table is recomputed
    assert "[eval] fused" in out and "[eval] recovered" in out and "[eval] projector drift" in out
    assert "[eval] audio specialist" not in out and "[eval] base" not in out


def test_changed_config_invalidates_stage(mini, tmp_path):
    cfg, _ = load_pipeline_config(mini_args(mini) + ["--fuse.alpha", "{image: 0.3, video: 0.3, document: 0.3, audio: 0.6}"])
    pipe = Pipeline(cfg)
    status = {s.name: pipe.is_done(s) for s in pipe.stages}
    assert status["fuse"] is False and status["grid"] is False  # both fuse with these coefficients
    assert status["specialist-audio"] is True and status["joint-all"] is True


def test_failing_stage_stops_and_keeps_finished_stages(mini, tmp_path, capsys):
    from omni_lightning.app.pipeline import config_path

    bad = tmp_path / "recover-bad.yaml"
    bad.write_text(config_path("recover.yaml").read_text().replace("train_parts: [projector]",
                                                                   "train_parts: [projector]\n    no_such_option: 1"))
    args = mini_args(mini) + ["--recover", str(bad)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 'recover' failed" in err
    assert "finished stages (skipped on the next run):" in err and "fuse" in err.split("finished stages")[-1]
    cfg, _ = load_pipeline_config(args)
    pipe = Pipeline(cfg)
    status = {s.name: pipe.is_done(s) for s in pipe.stages}
    assert status["fuse"] and status["specialist-image"] and not status["recover"]
    with pytest.raises(PipelineError, match="recover"):
        pipe.run()


def test_unknown_force_stage_is_an_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--force", "fusion"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_pipeline_without_recovery_rehearses_the_fused_model(tmp_path):
    """`recover: null` (e.g. a vision-only recipe, no audio specialist): no recover stage and no recovered row;
    rehearsal starts from the fused model and the report checks it against the fused numbers."""
    from omni_lightning.model.config import OmniConfig

    out = tmp_path / "run"
    args = mini_args(out) + ["--recover", "null", "--specialists", "{image: specialist/image.yaml, video: "
                             "specialist/video.yaml}", "--fuse.alpha", "{image: 0.3, video: 0.3}",
                             "--fuse.grid", "null", "--joint", "{}", "--eval.modalities", "[image, video, text]"]
    assert main(args) == 0
    cfg, _ = load_pipeline_config(args)
    pipe = Pipeline(cfg)
    assert [s.name for s in pipe.stages][-3:] == ["specialist-video", "fuse", "rehearse"]
    assert not (out / "recovered").exists()
    assert OmniConfig.load(out / "final").history[-1]["from"] == str(out / "fused")
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["base", "image specialist", "video specialist", "fused", "final (rehearsed)"]
    assert report["backbone_after_recovery"] is None and report["drift"] == {}
    (check,) = [c for c in report["pattern"] if c["check"].startswith("rehearsal keeps")]
    assert check["check"].endswith("its fused value")
    worst = min(report["results"]["final (rehearsed)"][m]["q2c_hit1"] - report["results"]["fused"][m]["q2c_hit1"]
                for m in ("image", "video"))
    assert f"{worst:+.3f}" in check["measured"]
    assert not any("recovery" in c["check"] for c in report["pattern"])


def test_missing_inputs_fail_before_anything_is_written(tmp_path, capsys):
    """A missing base model, data root or config is an error naming it, with nothing written (no corpus generated);
    an output folder that holds an input is refused."""
    out = tmp_path / "run"
    for flags, message in ((["--base.model", str(tmp_path / "no-base")], "is not a model directory"),
                           (["--data.root", str(tmp_path / "no-data")], "has no train shards"),
                           (["--recover", "no-such-config.yaml"], "no-such-config.yaml not found")):
        assert main(["--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    data = tmp_path / "run" / "data"
    for m in ("image", "video", "document", "audio"):
        (data / m / "train").mkdir(parents=True)
        (data / m / "train" / "index.json").write_text("{}")
    assert main(["--out", str(out), "--data.root", str(data)]) == 2
    assert "contains the data.root" in capsys.readouterr().err
