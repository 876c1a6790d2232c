"""The evaluation of ``omni-lightning eval`` on a schedule during fit, logged per metric and modality.

:class:`RetrievalEval` runs :func:`omni_lightning.evaluation.evaluate_samples` on the first ``max_samples``
eval pairs of each modality (the same pairs every time, so successive values compare) after every
``every_n_epochs``-th validation, on rank 0, and logs ``<phase>/eval/<metric>/<modality>`` for every metric of
:data:`omni_lightning.evaluation.METRICS` (hit@1/5/10, recall@1/5/10, nDCG@10 and MRR both ways, pool Hit@1,
zero-shot accuracy). The model is evaluated as it trains (LoRA adapters active), in eval mode, without gradients.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from omni_lightning.data.shards import split_dir
from omni_lightning.evaluation.retrieval import METRICS, evaluate_samples, load_split
from omni_lightning.model.processor import OmniProcessor
from omni_lightning.tracking.catalogue import eval_metric


class RetrievalEval(Callback):
    """Args:
        modalities: the modalities to evaluate (default: the datamodule's).
        data_root: dataset root (default: the datamodule's ``data_root``).
        split: the split evaluated.
        every_n_epochs: evaluate after every n-th validation epoch.
        max_samples: pairs per modality (the first ones of the split).
        batch_size: encoding batch size.
        pool_size: candidates per query for pool Hit@1.
        at_fit_start: also evaluate (and log at step 0) before training starts.
    """

    def __init__(self, modalities: list[str] | None = None, data_root: str | None = None, split: str = "eval",
                 every_n_epochs: int = 1, max_samples: int = 256, batch_size: int = 64, pool_size: int = 100,
                 at_fit_start: bool = False) -> None:
        super().__init__()
        if every_n_epochs < 1 or max_samples < 2:
            raise ValueError("RetrievalEval: every_n_epochs must be >= 1 and max_samples >= 2")
        self.modalities, self.data_root, self.split = modalities, data_root, split
        self.every_n_epochs, self.max_samples = every_n_epochs, max_samples
        self.batch_size, self.pool_size, self.at_fit_start = batch_size, pool_size, at_fit_start
        self._samples: dict[str, list[dict]] | None = None
        self._processor: Any = None
        self.history: list[dict[str, Any]] = []

    def _load(self, trainer: Trainer) -> dict[str, list[dict]]:
        dm = trainer.datamodule
        root = self.data_root or getattr(dm, "data_root", None)
        mods = self.modalities or list(getattr(dm, "modalities", []) or [])
        if root is None or not mods:
            raise ValueError("RetrievalEval needs data_root and modalities (or a datamodule that has them)")
        return {m: load_split(split_dir(root, m, self.split), self.max_samples) for m in mods}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, dict[str, float]]:
        if self._samples is None:
            self._samples = self._load(trainer)
        if self._processor is None:
            self._processor = OmniProcessor.from_pretrained(pl_module.model_dir)
        pool = min(self.pool_size, self.max_samples)
        results = {m: evaluate_samples(pl_module.embedder, self._processor, s, self.batch_size, pool_size=pool,
                                       progress=False) for m, s in self._samples.items()}
        self.history.append({"global_step": int(trainer.global_step), "results": results})
        return results

    @staticmethod
    def _metrics(phase: str, results: dict[str, dict[str, float]]) -> dict[str, float]:
        return {eval_metric(phase, k, m): float(v) for m, r in results.items() for k, v in r.items() if k in METRICS}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_start and trainer.is_global_zero:
            metrics = self._metrics(pl_module.phase, self.evaluate(trainer, pl_module))
            if trainer.logger is not None:  # self.log is not allowed in on_fit_start
                trainer.logger.log_metrics(metrics, step=0)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        for k, v in self._metrics(pl_module.phase, self.evaluate(trainer, pl_module)).items():
            pl_module.log(k, v, rank_zero_only=True)
