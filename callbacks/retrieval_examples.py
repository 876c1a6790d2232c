"""A W&B table of retrieval examples: a few queries, the item they should find, and their top hits as media.

For each modality a pool is read from the eval split (the first ``pool_size`` samples, the same every time):
candidates are the samples' positives (images, video frames, document pages, audio clips); the first
``num_queries`` samples' queries (text with its instruction) are ranked against the whole pool with the
model's own ``encode``. A row per query: the modality, the query, its target, the ``top_k`` hits (images and
video frame strips as ``wandb.Image``, clips as ``wandb.Audio``, each captioned with the text it was paired
with and its score), whether hit 1 is relevant (same ``label``, else the query's own pair) and the rank of
the first relevant candidate.

:class:`RetrievalExamples` logs one table per modality (a column holds one kind of media),
``<phase>/eval/examples/<modality>``, when training ends (rank 0, only when a ``WandbLogger`` is attached; with
any other logger it does nothing). The eval job
(``omni-lightning jobs eval``) logs the same table for each model it evaluates.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from omni_lightning.evaluation.examples import load_pool, retrieval_examples
from omni_lightning.model.processor import OmniProcessor
from omni_lightning.tracking.catalogue import examples_table
from omni_lightning.tracking.runs import wandb_table


class RetrievalExamples(Callback):
    """Log ``<phase>/eval/examples/<modality>`` (tables of retrieval examples with media) when training ends.

    Args:
        num_queries: queries (rows) per modality.
        top_k: hits shown per query.
        pool_size: candidates per modality: the first samples of the split.
        split: the split read under the datamodule's ``data_root`` (or ``data_root``).
        modalities: modalities to show (default: the datamodule's, without ``text``).
        data_root: dataset root (default: the datamodule's ``data_root``).
        batch_size: encoding batch size.
    """

    def __init__(self, num_queries: int = 8, top_k: int = 3, pool_size: int = 128, split: str = "eval",
                 modalities: list[str] | None = None, data_root: str | None = None, batch_size: int = 32) -> None:
        super().__init__()
        if num_queries < 1 or top_k < 1 or pool_size < top_k:
            raise ValueError(f"RetrievalExamples needs num_queries >= 1 and 1 <= top_k <= pool_size; got "
                             f"num_queries={num_queries}, top_k={top_k}, pool_size={pool_size}")
        self.num_queries, self.top_k, self.pool_size, self.split = num_queries, top_k, pool_size, split
        self.modalities, self.data_root, self.batch_size = modalities, data_root, batch_size
        self.rows: list[dict[str, Any]] = []

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_train_end, not on_fit_end: the model is still on its device (Lightning moves it to the CPU after)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            rank_zero_warn("RetrievalExamples: skipped under FSDP (rank 0 alone cannot run the sharded model)")
            return
        dm = trainer.datamodule
        root = self.data_root or getattr(dm, "data_root", None)
        if root is None:
            raise ValueError("RetrievalExamples needs data_root (or a datamodule with a data_root)")
        mods = [m for m in (self.modalities or getattr(dm, "modalities", [])) if m != "text"]
        processor = OmniProcessor.from_pretrained(pl_module.model_dir)
        self.rows = []
        for m in mods:
            pool = load_pool(root, m, self.split, self.pool_size)
            self.rows += retrieval_examples(pl_module.embedder, processor, pool, self.num_queries, self.top_k,
                                            self.batch_size)
        tables = {examples_table(pl_module.phase, m): wandb_table([r for r in self.rows if r["modality"] == m],
                                                                 self.top_k)
                  for m in dict.fromkeys(r["modality"] for r in self.rows)}
        if tables:
            for lg in loggers:
                lg.log_metrics(tables, step=trainer.global_step)


__all__ = ["RetrievalExamples"]
