"""The :class:`ProjectorDrift` callback: logs projector drift (:mod:`omni_lightning.evaluation.drift`) at fit start
and after every validation, as ``<phase>/drift/<metric>``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from omni_lightning.evaluation.drift import load_pairs, measure_drift, projector_owner
from omni_lightning.model.omni import OmniEmbedder
from omni_lightning.model.processor import OmniProcessor
from omni_lightning.tracking.catalogue import drift as drift_metric


class ProjectorDrift(Callback):
    """Measure projector drift at fit start and after each validation; log ``<phase>/drift/<metric>``.

    Args:
        data_root: dataset root with ``audio/<split>/`` shards of audio–text pairs (default: the
            datamodule's ``data_root``).
        reference: model directory to compare audio embeddings with, ``"auto"`` (default: the specialist that
            owns the projector according to the model's fusion record in ``omni_config.json``, when that
            directory exists), or ``None``.
        split: split to read (default ``eval``).
        max_samples: pairs measured (the first ones of the split, the same every time).
        batch_size: encoding batch size.
    """

    def __init__(self, data_root: str | None = None, reference: str | None = "auto", split: str = "eval", max_samples: int = 256,
                 batch_size: int = 64) -> None:
        super().__init__()
        self.data_root, self.reference_dir, self.split = data_root, reference, split
        self.max_samples, self.batch_size = max_samples, batch_size
        self._samples: list[dict] | None = None
        self._reference: Any = None
        self._processor: Any = None
        self._reference_processor: Any = None
        self.history: list[dict[str, float]] = []

    def _measure(self, pl_module: LightningModule) -> dict[str, float]:
        if self._samples is None:
            root = self.data_root or getattr(pl_module.trainer.datamodule, "data_root", None)
            if root is None:
                raise ValueError("ProjectorDrift needs data_root (or a datamodule with a data_root)")
            self._samples = load_pairs(root, self.split, self.max_samples)
        model = pl_module.embedder
        if self._processor is None:
            self._processor = OmniProcessor.from_pretrained(pl_module.model_dir)
        if self.reference_dir == "auto":
            self.reference_dir = projector_owner(model.config)
        if self.reference_dir and self._reference is None:
            self._reference = OmniEmbedder.from_pretrained(self.reference_dir).to(pl_module.device).eval()
            self._reference_processor = OmniProcessor.from_pretrained(self.reference_dir)
        result = measure_drift(model, self._processor, self._samples, self._reference,
                               self._reference_processor, self.batch_size)
        self.history.append({"global_step": int(pl_module.global_step), **result})
        return result

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        result = self._measure(pl_module)
        if trainer.logger is not None:  # self.log is not allowed in on_fit_start
            trainer.logger.log_metrics({drift_metric(pl_module.phase, k): v for k, v in result.items()}, step=0)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for k, v in self._measure(pl_module).items():
            pl_module.log(drift_metric(pl_module.phase, k), v, rank_zero_only=True)
