"""Freeze named model parts for a whole run (projector recovery: everything but the audio projector).

A :class:`~lightning.pytorch.callbacks.BaseFinetuning` callback. ``freeze_before_training`` runs in
``setup`` — before ``configure_optimizers`` and before DDP wraps the model — so frozen parameters never
reach the optimizer and DDP neither syncs them nor complains that they are unused. Frozen modules are put in
eval mode (dropout off, norms fixed); Lightning (≥ 2.2) keeps that mode through training and validation.
Nothing is unfrozen mid-run (unfreezing under DDP does not sync, Lightning #20340): a phase that trains more
parts is a separate run.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info

from omni_lightning.model.config import expand_parts
from omni_lightning.tracking.catalogue import trainable_params


class FreezeBackbone(BaseFinetuning):
    """Freeze ``frozen`` parts; require that exactly the ``trainable`` parts (and nothing else) train.

    Args:
        frozen: parts or groups to freeze (default: the whole backbone with its vision encoder, and the
            audio encoder).
        trainable: parts that must remain trainable (default: the audio projector, all of its parameters).
            Everything not listed here ends up frozen too, whatever the module configured.
    """

    def __init__(self, frozen: list[str] | None = None, trainable: list[str] | None = None) -> None:
        super().__init__()
        self.frozen = expand_parts(frozen if frozen is not None else ["backbone", "audio_encoder"])
        self.trainable = expand_parts(trainable if trainable is not None else ["projector"])
        overlap = set(self.frozen) & set(self.trainable)
        if overlap:
            raise ValueError(f"parts {sorted(overlap)} are listed as both frozen and trainable")
        if not self.trainable:
            raise ValueError("FreezeBackbone leaves nothing trainable: name at least one part in `trainable`")
        self.counts: dict[str, dict[str, int]] = {}

    @staticmethod
    def _embedder(pl_module: LightningModule):
        emb = getattr(pl_module, "embedder", None)
        if emb is None or not hasattr(emb, "part"):
            raise TypeError(f"FreezeBackbone needs an omni-lightning module with an `embedder`, got {type(pl_module).__name__}")
        return emb

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        model = self._embedder(pl_module)
        for name in self.frozen:
            module = model.part(name)
            self.freeze(module, train_bn=False)
            module.eval()
        # anything else the module made trainable outside the `trainable` parts is frozen too
        allowed = tuple(model.config.parts[p] for p in self.trainable)
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith(allowed):
                p.requires_grad_(False)
        for name in self.trainable:
            params = list(model.part(name).parameters())
            if not params:
                raise ValueError(f"trainable part {name!r} has no parameters in this model")
            for p in params:
                p.requires_grad_(True)
        self.counts = {}
        for part, prefix in model.config.parts.items():
            ps = [p for n, p in model.named_parameters() if n.startswith(prefix)]
            self.counts[part] = {
                "trainable": sum(p.numel() for p in ps if p.requires_grad),
                "frozen": sum(p.numel() for p in ps if not p.requires_grad),
            }
        rank_zero_info(
            "FreezeBackbone: "
            + ", ".join(f"{k} trainable={v['trainable']:,} frozen={v['frozen']:,}" for k, v in self.counts.items())
        )

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer) -> None:
        """Never unfreezes."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # the optimizer must hold exactly the trainable parameters
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        frozen_in_opt = in_opt - trainable
        if frozen_in_opt:
            raise RuntimeError(f"{len(frozen_in_opt)} frozen parameters are in the optimizer; build it from "
                               "parameters that require grad")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        phase = getattr(pl_module, "phase", "train")
        for part, c in self.counts.items():
            pl_module.log(trainable_params(phase, part), float(c["trainable"]), on_step=False, on_epoch=True)
