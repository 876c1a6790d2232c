"""Retrieval evaluation per modality on eval shards.

For each modality's eval split: every sample's query (text with its instruction) is scored against the
pool of every sample's positive (the media), and the reverse (media → text). A candidate is relevant to a
query when they share the sample ``label`` (captions repeat across instances), or when it is the query's
own pair if the shard carries no labels. Metrics (torchmetrics retrieval): R@1, R@5 and MRR per direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_reciprocal_rank
from tqdm.auto import tqdm

from omni_lightning.data.schema import MODALITIES
from omni_lightning.data.shards import iter_samples, split_dir


def relevance(query_labels: list, cand_labels: list) -> Tensor:
    """``[Q, C]`` bool: same label (or same index when labels are missing)."""
    if all(x is not None for x in query_labels) and all(x is not None for x in cand_labels):
        codes: dict[Any, int] = {}
        q = torch.tensor([codes.setdefault(x, len(codes)) for x in query_labels])
        c = torch.tensor([codes.setdefault(x, len(codes)) for x in cand_labels])
        return q[:, None] == c[None, :]
    if len(query_labels) != len(cand_labels):
        raise ValueError("without labels, queries and candidates must be paired one to one")
    return torch.eye(len(query_labels), dtype=torch.bool)


def retrieval_scores(scores: Tensor, relevant: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Mean R@k (hit rate: a relevant candidate in the top k) and MRR over queries."""
    out: dict[str, list[float]] = {f"r{k}": [] for k in ks}
    out["mrr"] = []
    for s, r in zip(scores, relevant):
        for k in ks:
            out[f"r{k}"].append(float(retrieval_hit_rate(s, r, top_k=k)))
        out["mrr"].append(float(retrieval_reciprocal_rank(s, r)))
    return {k: sum(v) / max(len(v), 1) for k, v in out.items()}


@torch.no_grad()
def evaluate_split(model, processor, directory: str | Path, batch_size: int = 64, progress: bool = True) -> dict[str, float]:
    samples = list(iter_samples(str(directory), resampled=False, split_nodes=False, split_workers=False))
    if not samples:
        raise ValueError(f"no samples in {directory}")
    model.eval()
    queries, cands = [], []
    bar = tqdm(total=2 * len(samples), desc=f"encode {Path(directory).parent.name}", disable=not progress, leave=False)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        queries.append(model.encode(processor, [s["query"] for s in chunk], [s["instruction"] for s in chunk], len(chunk)))
        bar.update(len(chunk))
        cands.append(model.encode(processor, [s["pos"] for s in chunk], None, len(chunk)))
        bar.update(len(chunk))
    bar.close()
    q, c = torch.cat(queries), torch.cat(cands)
    labels = [s.get("label") for s in samples]
    rel = relevance(labels, labels)
    fwd = retrieval_scores(q @ c.T, rel)
    bwd = retrieval_scores(c @ q.T, rel.T)
    out = {f"q2c_{k}": v for k, v in fwd.items()}
    out.update({f"c2q_{k}": v for k, v in bwd.items()})
    out["n"] = len(samples)
    return out


def evaluate_model(model_dir: str | Path, data_root: str | Path, modalities: list[str] | None = None,
                   split: str = "eval", batch_size: int = 64, progress: bool = True) -> dict[str, dict[str, float]]:
    from omni_lightning.model.omni import load_model_and_processor

    model, processor = load_model_and_processor(model_dir)
    results = {}
    for m in modalities or [m for m in MODALITIES if split_dir(data_root, m, split).is_dir()]:
        results[m] = evaluate_split(model, processor, split_dir(data_root, m, split), batch_size, progress)
    return results


def format_table(rows: dict[str, dict[str, dict[str, float]]], metric: str = "q2c_r1") -> str:
    """A markdown table: one row per model, one column per modality, cells = ``metric``."""
    mods = [m for m in MODALITIES if any(m in r for r in rows.values())]
    lines = ["| model | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
    for name, res in rows.items():
        cells = [f"{res[m][metric]:.3f}" if m in res else "–" for m in mods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
