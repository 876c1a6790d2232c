"""Balanced multi-modal rehearsal (docs/method.md): the last training step, from the recovered model.

LoRA (through peft) on the backbone -- the language model and the vision encoder -- trained on batches from
every modality, drawn by the balanced sampler (:mod:`omni_lightning.data.balanced_sampler`); the audio
encoder stays frozen and so does the projector unless ``train_parts`` names it. The paper uses lr 1e-5 for
about 2000 steps; LoRA is merged into dense weights when fit ends and the export is the final model directory.
The export's history records the modality weights and the mix actually trained.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable

from omni_lightning.modules.base import LoraSettings, OmniModule

PAPER_LR = 1e-5


def adamw_paper_lr(params: Any) -> torch.optim.Optimizer:
    """AdamW at the paper's rehearsal learning rate (1e-5), the default optimizer of this phase."""
    return torch.optim.AdamW(params, lr=PAPER_LR)


class RehearsalModule(OmniModule):
    """LoRA on ``lora.parts`` (default: the backbone = language model + vision encoder); ``train_parts``
    trains parts in full (default: none; ``[projector]`` un-freezes the projector)."""

    phase = "rehearse"

    def __init__(self, lora: LoraSettings | None = None, train_parts: list[str] | None = None,
                 optimizer: OptimizerCallable = adamw_paper_lr, **kwargs: Any) -> None:
        super().__init__(lora=lora if lora is not None else LoraSettings(parts=["backbone"]),
                         train_parts=train_parts if train_parts is not None else [], optimizer=optimizer, **kwargs)

    def export_record(self) -> dict[str, Any]:
        record = super().export_record()
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and getattr(data, "probs", None):
            record["weights"] = {m: round(p, 6) for m, p in data.probs.items()}
            record["mix"] = {m: round(p, 6) for m, p in data.mix.items()}
            record["mixed_batches"] = bool(getattr(data, "mixed_batches", False))
        return record
