"""Projector Recovery: re-fit only the audio projector to the fused backbone.

The fused backbone and the audio encoder stay exactly as fused (frozen by the ``FreezeBackbone`` callback in
``configs/recover.yaml``; their forward runs without autograd bookkeeping where no trainable parameter is
reached); the projector — all of its parameters — trains on audio–text pairs with the shared contrastive
core. The export is the recovered model directory.
"""

from __future__ import annotations

from typing import Any

from omni_lightning.modules.base import OmniModule


class RecoveryModule(OmniModule):
    """Trains ``train_parts`` (default: the projector) and nothing else; no LoRA."""

    phase = "recover"

    def __init__(self, train_parts: list[str] | None = None, **kwargs: Any) -> None:
        if kwargs.get("lora") is not None:
            raise ValueError("projector recovery trains the projector in full; remove `lora` from the config")
        super().__init__(train_parts=train_parts if train_parts is not None else ["projector"], **kwargs)
