"""Joint training: the baseline the recipe's decoupling is measured against. One model trained from θ₀ on several
modalities at once — the balanced sampler over their shards, LoRA on the parts those modalities reach — with the
same total steps and data as the specialists of those modalities combined (the pipeline sets the steps). In the
paper, joint training on all four modalities cost the visual scores most of what fusion then keeps.
"""

from __future__ import annotations

from omni_lightning.modules.rehearse import RehearsalModule


class JointModule(RehearsalModule):
    """Rehearsal's mechanics (LoRA + balanced sampler, the mix recorded in the export), started from θ₀."""

    phase = "joint"
