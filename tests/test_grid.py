"""The α grid: settings expand as documented, the rule picks the best, eval is refused as the scoring split, and
`fuse --grid` scores each setting exactly as `fuse` + `eval --split diag` of that setting would."""

from __future__ import annotations

import json

import pytest

from omni_lightning.app.cli import main
from omni_lightning.app.grid import GridConfig, score, settings
from omni_lightning.evaluation import evaluate_model
from omni_lightning.fusion import FuseConfig, fuse

NAMES = ["image", "video", "document", "audio"]


def test_settings_are_the_product_of_the_axes_with_vision_setting_three_coefficients():
    grid = GridConfig(axes={"audio": [0.1, 0.9], "vision": [0.3, 0.6]})
    got = settings(grid, NAMES, [0.3, 0.3, 0.3, 0.5])
    assert got == [
        {"image": 0.3, "video": 0.3, "document": 0.3, "audio": 0.1},
        {"image": 0.6, "video": 0.6, "document": 0.6, "audio": 0.1},
        {"image": 0.3, "video": 0.3, "document": 0.3, "audio": 0.9},
        {"image": 0.6, "video": 0.6, "document": 0.6, "audio": 0.9},
    ]
    # an axis naming one specialist leaves the others at fuse.yaml's coefficients
    assert settings(GridConfig(axes={"video": [1.0]}), NAMES, [0.3, 0.3, 0.3, 0.5]) == [
        {"image": 0.3, "video": 1.0, "document": 0.3, "audio": 0.5}]


def test_rules_and_validation(tmp_path):
    assert score({"a": 0.2, "b": 0.6}, "mean") == pytest.approx(0.4) and score({"a": 0.2, "b": 0.6}, "min") == 0.2
    with pytest.raises(ValueError, match="not on 'eval'"):
        GridConfig(split="eval").validate(NAMES)
    with pytest.raises(ValueError, match="not a specialist"):
        GridConfig(axes={"speech": [1.0]}).validate(NAMES)
    with pytest.raises(ValueError, match="rule"):
        GridConfig(rule="best").validate(NAMES)
    bad = tmp_path / "g.yaml"
    bad.write_text("axis: {audio: [1]}\n")
    with pytest.raises(ValueError, match="unknown key"):
        GridConfig.load(bad)


@pytest.fixture(scope="module")
def two_specialists(tiny_model_dir, tmp_path_factory):
    """Two 'specialists' whose weights moved from θ₀ (by different deterministic amounts)."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("grid-specs")
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    dirs = []
    for i, name in enumerate(("image", "audio")):
        d = root / name
        import shutil

        shutil.copytree(tiny_model_dir, d)
        g = torch.Generator().manual_seed(i)
        moved = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                 for k, v in state.items()}
        save_file(moved, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def test_fuse_grid_scores_each_setting_like_fuse_then_eval(tiny_model_dir, two_specialists, demo_root, tmp_path,
                                                           capsys):
    from omni_lightning.demo import make_demo_data

    data = tmp_path / "data"
    make_demo_data(data, n_train=16, n_eval=8, n_diag=12, modalities=["image", "audio"], max_per_shard=16)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("axes: {audio: [0.2, 1.0]}\nmax_samples: 12\nbatch_size: 16\n")
    out = tmp_path / "grid"
    rc = main(["fuse", "--base", str(tiny_model_dir), "--specialists", *map(str, two_specialists),
               "--alpha", "0.3", "0.5", "--grid", str(grid_file), "--data", str(data), "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "grid.json").read_text())
    assert [s["alpha"] for s in summary["settings"]] == [{"image": 0.3, "audio": 0.2}, {"image": 0.3, "audio": 1.0}]
    assert not [p for p in out.iterdir() if p.name.startswith(".grid-fused")]  # the work folder is gone
    # an independent run of the same setting: fuse, then evaluate on the diagnostic split
    one = tmp_path / "one"
    fuse(FuseConfig(base=str(tiny_model_dir), specialists=[str(d) for d in two_specialists], alpha=[0.3, 1.0],
                    out=str(one), progress=False))
    res = evaluate_model(one, data, modalities=["image", "audio"], split="diag", max_samples=12, progress=False)
    assert summary["settings"][1]["hit1"] == {m: pytest.approx(res[m]["q2c_hit1"], abs=1e-9) for m in ("image", "audio")}
    best = max(summary["settings"], key=lambda s: s["score"])
    assert summary["best"]["alpha"] == best["alpha"] and "best by the rule" in capsys.readouterr().out
    # a data root without the diagnostic split is a clear error
    rc = main(["fuse", "--base", str(tiny_model_dir), "--specialists", *map(str, two_specialists),
               "--alpha", "0.3", "0.5", "--grid", str(grid_file), "--data", str(demo_root), "--out", str(out)])
    assert rc == 2 and "no 'diag' split" in capsys.readouterr().err
