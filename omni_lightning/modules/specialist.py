"""Decoupled specialists: one per modality, trained from the shared base on that modality's data only.

The paper trains each specialist with LoRA on all linear layers (backbone and vision encoder; for audio also
the audio encoder and projector) and merges LoRA into dense weights afterwards, so task vectors are dense.
Which parts get LoRA and which train in full is configuration (``lora.parts``, ``train_parts``); the
export writes a dense model directory that ``OmniEmbedder.from_pretrained`` loads.
"""

from __future__ import annotations

from typing import Any

from omni_lightning.modalities import MODALITIES
from omni_lightning.modules.base import OmniModule


class SpecialistModule(OmniModule):
    """A modality specialist. ``modality`` is recorded in the exported model's history."""

    phase = "specialist"

    def __init__(self, modality: str, **kwargs: Any) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        super().__init__(**kwargs)
        self.modality = modality

    def export_record(self) -> dict[str, Any]:
        return {**super().export_record(), "modality": self.modality}
