"""Every YAML under configs/ parses through the command it belongs to (``--print_config``), in seconds, and the
values a config sets are the values printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omni_lightning.app.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


GRID = REPO / "configs" / "fuse-grid.yaml"  # the α grid file `fuse --grid` reads (not a subcommand's options)


def command(config: Path) -> str:
    """The subcommand a config belongs to: LightningCLI's ``fit`` for phase configs, else its file name."""
    return "fit" if "trainer" in yaml.safe_load(config.read_text()) else config.stem


def test_every_config_has_a_command():
    assert {command(c) for c in CONFIGS if c != GRID} == {"fit", "fuse", "pipeline"}
    assert len(CONFIGS) >= 12


def test_the_grid_file_parses_and_validates():
    from omni_lightning.app.grid import GridConfig

    grid = GridConfig.load(GRID)
    grid.validate(["image", "video", "document", "audio"])
    assert grid.split == "diag" and set(grid.axes) == {"audio", "vision"}


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != GRID],
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, capsys):
    cmd = command(config)
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(config.read_text())
    if cmd == "fit":
        assert printed["model"]["class_path"].startswith("omni_lightning.")
        assert printed["model"]["init_args"]["model"] == given["model"]["init_args"]["model"]
    else:  # every key the file sets comes back with its value
        for key, value in given.items():
            assert printed[key] == value or isinstance(value, dict), key


def test_a_misspelled_key_is_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "fuse.yaml"
    bad.write_text((REPO / "configs/fuse.yaml").read_text().replace("method:", "methd:"))
    assert main(["fuse", "--config", str(bad)]) == 2
    assert "methd" in capsys.readouterr().err
