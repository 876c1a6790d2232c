"""The names the recipe is made of, written once: modalities, specialists, phases.

A *modality* is what a sample's query–positive pair is about; ``text`` pairs are text–text. The recipe trains
one *specialist* per media modality, fuses them, recovers the audio projector and rehearses all of them. Model
*phases* name the step that produced a model directory (``base`` for θ₀); training phases are the
LightningModules' ``phase``.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = ("text", "image", "video", "document", "audio")
SPECIALISTS: tuple[str, ...] = ("image", "video", "document", "audio")
VISUAL: tuple[str, ...] = ("image", "video", "document")  # what the vision encoder sees
# the modalities each training phase logs per-modality metrics for
FIT_PHASES: dict[str, tuple[str, ...]] = {"specialist": SPECIALISTS, "recover": ("audio",), "rehearse": SPECIALISTS}
# phases of the models an eval job compares (θ₀, the specialists, fused, recovered, final)
MODEL_PHASES: tuple[str, ...] = ("base", "specialist", "fuse", "recover", "rehearse")
