"""The embedded default model: a preset of the real architectures whose tokenizer reads the demo world."""

from __future__ import annotations

from pathlib import Path

from omni_lightning.demo.corpus import demo_vocabulary
from omni_lightning.model.build import build_preset, init_model


def build_demo_preset(preset: str = "tiny", seed: int = 0):
    """(model, backbone processor) of an embedded preset with the demo vocabulary."""
    return build_preset(preset, seed, demo_vocabulary())


def init_demo_model(out: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write the embedded ``preset`` (``tiny`` or ``small``) as a model directory, tokenizer trained on the demo
    vocabulary."""
    return init_model(out, preset=preset, seed=seed, overwrite=overwrite, vocabulary=demo_vocabulary())
