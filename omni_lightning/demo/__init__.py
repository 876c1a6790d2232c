"""The demo world: the generated corpus (every modality's pairs and the stage-0 corpus) and the embedded
default model whose tokenizer reads it."""

from omni_lightning.demo.corpus import (
    DEMO_INSTRUCTIONS,
    DEMO_SAMPLE_RATE,
    DEMO_TASKS,
    demo_captions,
    demo_samples,
    demo_vocabulary,
    make_demo_data,
)
from omni_lightning.demo.preset import build_demo_preset, init_demo_model

__all__ = [
    "DEMO_INSTRUCTIONS", "DEMO_SAMPLE_RATE", "DEMO_TASKS", "build_demo_preset", "demo_captions", "demo_samples",
    "demo_vocabulary", "init_demo_model", "make_demo_data",
]
