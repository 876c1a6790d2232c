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
(``python -m omni_lightning.tracking eval``) logs the same table for each model it evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from omni_lightning.data.shards import split_dir
from omni_lightning.evaluation import load_split


def load_pool(data_root: str | Path, modality: str, split: str = "eval", pool_size: int = 128) -> list[dict]:
    """The first ``pool_size`` decoded samples of ``<data_root>/<modality>/<split>``."""
    d = split_dir(data_root, modality, split)
    if not d.is_dir():
        raise FileNotFoundError(f"no {split} shards for {modality} under {data_root} ({d} does not exist)")
    return load_split(d, pool_size)


def _text(item: dict) -> str:
    return item["text"] if item.get("type") == "text" else f"<{item.get('type')}>"


@torch.no_grad()
def retrieval_examples(model, processor, samples: list[dict], num_queries: int = 8, top_k: int = 3,
                       batch_size: int = 32) -> list[dict[str, Any]]:
    """Rank every sample's positive for the first ``num_queries`` queries; one dict per query.

    ``model`` is an :class:`~omni_lightning.model.OmniEmbedder` (its train/eval modes are restored).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        queries = samples[:num_queries]
        q = model.encode(processor, [s["query"] for s in queries], [s["instruction"] for s in queries], batch_size)
        c = model.encode(processor, [s["pos"] for s in samples], None, batch_size)
    finally:
        for m, t in modes.items():
            m.train(t)
    scores = q.float() @ c.float().T
    labels = [s.get("label") for s in samples]
    labelled = all(x is not None for x in labels)
    k = min(top_k, len(samples))
    rows = []
    for i, s in enumerate(queries):
        relevant = [labels[j] == labels[i] if labelled else j == i for j in range(len(samples))]
        order = torch.argsort(scores[i], descending=True, stable=True).tolist()
        first = next((r + 1 for r, j in enumerate(order) if relevant[j]), None)
        rows.append({
            "modality": s["modality"],
            "query": _text(s["query"]),
            "target": s["pos"],
            "target_text": _text(s["query"]),
            "hits": [{"item": samples[j]["pos"], "text": _text(samples[j]["query"]), "score": float(scores[i, j]),
                      "relevant": bool(relevant[j])} for j in order[:k]],
            "correct_at_1": bool(relevant[order[0]]),
            "rank_of_first_relevant": first,
        })
    return rows


def to_media(item: dict, caption: str | None = None):
    """A decoded item as W&B media: ``wandb.Image`` (image, document, video frames side by side),
    ``wandb.Audio`` (audio) or the text itself."""
    import wandb

    kind = item.get("type")
    if kind in ("image", "document"):
        return wandb.Image(np.asarray(item["image"]), caption=caption)
    if kind == "video":
        frames = np.asarray(item["frames"])
        step = max(1, len(frames) // 8)  # at most 8 frames in the strip
        return wandb.Image(np.concatenate(list(frames[::step][:8]), axis=1), caption=caption)
    if kind == "audio":
        return wandb.Audio(np.asarray(item["waveform"], dtype=np.float32), sample_rate=int(item["sample_rate"]),
                           caption=caption)
    return item.get("text", "")


def table_columns(top_k: int) -> list[str]:
    return (["modality", "query", "target"] + [f"hit_{r}" for r in range(1, top_k + 1)]
            + ["scores", "correct_at_1", "rank_of_first_relevant"])


def wandb_table(rows: list[dict[str, Any]], top_k: int = 3):
    """The rows of :func:`retrieval_examples` (of one modality: a column holds one kind of media) as a
    ``wandb.Table``."""
    import wandb

    data = []
    for r in rows:
        hits = [to_media(h["item"], f"{'✓' if h['relevant'] else '✗'} {h['score']:.3f} · {h['text']}") for h in r["hits"]]
        hits += [None] * (top_k - len(hits))
        data.append([r["modality"], r["query"], to_media(r["target"], r["target_text"]), *hits,
                     " / ".join(f"{h['score']:.3f}" for h in r["hits"]), r["correct_at_1"],
                     r["rank_of_first_relevant"]])
    return wandb.Table(columns=table_columns(top_k), data=data)


def examples_for_model(model_dir: str | Path, data_root: str | Path, modalities: list[str], num_queries: int = 8,
                       top_k: int = 3, pool_size: int = 128, split: str = "eval") -> list[dict[str, Any]]:
    """:func:`retrieval_examples` of a model directory over several modalities (text-only ones skipped)."""
    from omni_lightning.model.omni import load_model_and_processor

    model, processor = load_model_and_processor(model_dir)
    rows: list[dict[str, Any]] = []
    for m in modalities:
        if m == "text":
            continue
        rows += retrieval_examples(model, processor, load_pool(data_root, m, split, pool_size), num_queries, top_k)
    return rows


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
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            rank_zero_warn("RetrievalExamples: skipped under FSDP (rank 0 alone cannot run the sharded model)")
            return
        from omni_lightning.model.processor import OmniProcessor
        from omni_lightning.tracking import examples_table

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


__all__ = ["RetrievalExamples", "examples_for_model", "load_pool", "retrieval_examples", "to_media", "wandb_table"]
