"""Retrieval examples: a few queries, the item each should find, and their top hits.

For each modality a pool is read from the eval split (the first ``pool_size`` samples, the same every time):
candidates are the samples' positives (images, video frames, document pages, audio clips); the first
``num_queries`` samples' queries (text with its instruction) are ranked against the whole pool with the
model's own ``encode``. A row per query: the modality, the query, its target, the ``top_k`` hits (each with
the text it was paired with and its score), whether hit 1 is relevant (same ``label``, else the query's own
pair) and the rank of the first relevant candidate. :func:`omni_lightning.tracking.runs.wandb_table` turns
the rows into a W&B table with media; the ``RetrievalExamples`` callback and the eval job log it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omni_lightning.data.shards import split_dir
from omni_lightning.evaluation.retrieval import load_split
from omni_lightning.model.omni import load_model_and_processor


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


def examples_for_model(model_dir: str | Path, data_root: str | Path, modalities: list[str], num_queries: int = 8,
                       top_k: int = 3, pool_size: int = 128, split: str = "eval") -> list[dict[str, Any]]:
    """:func:`retrieval_examples` of a model directory over several modalities (text-only ones skipped)."""
    model, processor = load_model_and_processor(model_dir)
    rows: list[dict[str, Any]] = []
    for m in modalities:
        if m == "text":
            continue
        rows += retrieval_examples(model, processor, load_pool(data_root, m, split, pool_size), num_queries, top_k)
    return rows
