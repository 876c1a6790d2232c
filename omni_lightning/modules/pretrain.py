"""Stage 0: give the embedded tiny base the general abilities a real pretrained VLM base brings.

The recipe starts from a vision-language model that already reads text and sees (Qwen3-VL in the paper).
The tiny preset is drawn at random, so on its own it has neither: its specialists then learn from scratch,
and fusion's 0.3 · Δ of each vision specialist lands on a base with no vision to build on (docs/results.md).
Stage 0 trains the tiny base's language model and vision encoder in full on the *stage-0 corpus* —
text paraphrase pairs and generic "glyph" pictures (a grey digit captioned by its size), see
:mod:`omni_lightning.demo` — and exports θ₀. It is not part of the paper's recipe; a real checkpoint
skips it (``base.pretrain: null`` in ``configs/pipeline.yaml``).
"""

from __future__ import annotations

from typing import Any

from omni_lightning.modules.base import OmniModule


class PretrainModule(OmniModule):
    """Trains ``train_parts`` (default: the backbone — language model and vision encoder) in full."""

    phase = "pretrain"

    def __init__(self, train_parts: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(train_parts=train_parts if train_parts is not None else ["backbone"], **kwargs)
