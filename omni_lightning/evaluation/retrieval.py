"""Retrieval and classification evaluation per modality on eval shards — ``omni-lightning eval``.

For each modality's eval split every sample's query (text with its instruction) is scored against the pool
of every sample's positive (``q2c``: text → media), and the reverse (``c2q``: media → text). A candidate is
relevant to a query when they share the sample ``label`` (captions repeat across instances), or when it is
the query's own pair if the shard carries no labels. Metrics per direction:

* ``hit1``, ``hit5``, ``hit10`` — hit@k, the share of queries with a relevant candidate in the top k
  (pytrec_eval's ``success@k``, MTEB's ``hit_rate_at_k``); ``recall1``, ``recall5``, ``recall10`` — recall@k,
  the share of a query's relevant candidates that are in its top k, averaged over queries (pytrec_eval's
  ``recall_k``, MTEB's ``recall_at_k``; it equals hit@k only when every query has one relevant candidate);
  ``ndcg10`` — nDCG@10 with binary gains (MTEB's headline retrieval score); ``mrr`` — mean reciprocal rank of
  the best relevant candidate, from its exact rank (pytrec_eval's ``recip_rank``, no cut-off);
* ``pool_hit1`` — MMEB-style Hit@1: each query ranks its own positive against a pool of ``pool_size``
  candidates (its hard negatives, then distractors of other labels drawn with a fixed seed);
* ``zs_acc`` — zero-shot classification (labelled shards): each media item is assigned the label whose
  caption (encoded as a query, with the instruction) is nearest.

Memory stays bounded for large pools: corpora are encoded in batches, and scores are computed in blocks of
``query_chunk × cand_chunk`` while a running top-k (k = 10) and the best relevant score per query are kept;
a second pass over the blocks counts the candidates ranked above that best relevant one (the exact rank
for MRR). Ties are broken by candidate order (the earlier candidate ranks first) everywhere, so chunked and
unchunked scoring agree exactly. (pytrec_eval, and so MTEB, breaks ties by document id, in descending order;
with candidate ids that sort descending in candidate order the two agree exactly — see the tests.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG
from tqdm.auto import tqdm

from omni_lightning.data.shards import SkipCounter, iter_samples, split_dir
from omni_lightning.modalities import MODALITIES
from omni_lightning.model.omni import load_model_and_processor

KS = (1, 5, 10)
NDCG_K = 10
RANKING_METRICS = (*[f"hit{k}" for k in KS], *[f"recall{k}" for k in KS], f"ndcg{NDCG_K}", "mrr")
METRICS = tuple(f"{d}_{m}" for d in ("q2c", "c2q") for m in RANKING_METRICS) + ("pool_hit1", "zs_acc")


# ---------------------------------------------------------------------------------------------- relevance
def label_codes(query_labels: list, cand_labels: list) -> tuple[Tensor, Tensor]:
    """Integer codes such that query ``i`` and candidate ``j`` are relevant iff their codes are equal.

    Same label when every item has one; otherwise queries and candidates must pair one to one (code = index).
    """
    if all(x is not None for x in query_labels) and all(x is not None for x in cand_labels):
        codes: dict[Any, int] = {}
        q = torch.tensor([codes.setdefault(x, len(codes)) for x in query_labels], dtype=torch.long)
        c = torch.tensor([codes.setdefault(x, len(codes)) for x in cand_labels], dtype=torch.long)
        return q, c
    if len(query_labels) != len(cand_labels):
        raise ValueError("without labels, queries and candidates must be paired one to one")
    idx = torch.arange(len(query_labels))
    return idx, idx.clone()


def relevance(query_labels: list, cand_labels: list) -> Tensor:
    """``[Q, C]`` bool: same label (or same index when labels are missing)."""
    q, c = label_codes(query_labels, cand_labels)
    return q[:, None] == c[None, :]


# ---------------------------------------------------------------------------------------------- ranking
@dataclass
class Ranking:
    """What the metrics need of each query's ranked candidate list.

    ``topk``: ``[Q, k]`` relevance of the k best candidates, best first; ``n_relevant``: ``[Q]`` relevant
    candidates in the pool; ``first_rank``: ``[Q]`` 1-based rank of the best relevant candidate (``inf``
    when there is none); ``k``: the cut-off asked for (``topk`` is narrower when the pool is smaller).
    """

    topk: Tensor
    n_relevant: Tensor
    first_rank: Tensor
    k: int


Blocks = Callable[[], Iterator[tuple[int, Tensor, Tensor]]]


def _rank_rows(blocks: Blocks, k: int) -> Ranking:
    """Rank one group of queries from score blocks ``(first candidate index, scores [Q, Cb], relevant [Q, Cb])``
    given in candidate order. Two passes; memory is one block plus O(Q·k)."""
    vals = rel = best = best_idx = n_rel = None
    for j0, s, r in blocks():
        if vals is None:
            Q = s.shape[0]
            vals, rel = s.new_empty(Q, 0), r.new_empty(Q, 0)
            best = s.new_full((Q,), float("-inf"))
            best_idx = torch.zeros(Q, dtype=torch.long)
            n_rel = torch.zeros(Q, dtype=torch.long)
        # running top-k: previous winners all have smaller candidate indices, so a stable sort keeps the
        # "earlier candidate first" tie order
        v, order = torch.cat([vals, s], 1).sort(dim=1, descending=True, stable=True)
        vals, rel = v[:, :k], torch.cat([rel, r], 1).gather(1, order)[:, :k]
        n_rel += r.sum(1)
        m, idx = s.masked_fill(~r, float("-inf")).max(1)  # max() returns the first maximal index
        better = m > best
        best = torch.where(better, m, best)
        best_idx = torch.where(better, idx + j0, best_idx)
    if vals is None:
        raise ValueError("no candidates to rank")
    above = torch.zeros_like(n_rel)
    for j0, s, _ in blocks():
        pos = torch.arange(j0, j0 + s.shape[1])
        above += (s > best[:, None]).sum(1) + ((s == best[:, None]) & (pos[None, :] < best_idx[:, None])).sum(1)
    first = torch.where(n_rel > 0, (above + 1).double(), torch.tensor(float("inf"), dtype=torch.double))
    return Ranking(rel, n_rel, first, k)


def rank_scores(scores: Tensor, relevant: Tensor, k: int = max(KS)) -> Ranking:
    """:class:`Ranking` of a score matrix already in memory (small pools)."""
    return _rank_rows(lambda: iter([(0, scores.float(), relevant.bool())]), k)


def rank_embeddings(queries: Tensor, cands: Tensor, q_codes: Tensor, c_codes: Tensor, k: int = max(KS),
                    query_chunk: int = 1024, cand_chunk: int = 16384) -> Ranking:
    """:class:`Ranking` of ``queries @ cands.T`` computed in ``query_chunk × cand_chunk`` blocks."""
    if query_chunk < 1 or cand_chunk < 1:
        raise ValueError("query_chunk and cand_chunk must be >= 1")
    queries, cands = queries.float(), cands.float()
    parts = []
    for i in range(0, len(queries), query_chunk):
        q, qc = queries[i : i + query_chunk], q_codes[i : i + query_chunk]

        def blocks(q=q, qc=qc):
            for j in range(0, len(cands), cand_chunk):
                c = cands[j : j + cand_chunk]
                yield j, q @ c.T, qc[:, None] == c_codes[None, j : j + len(c)]

        parts.append(_rank_rows(blocks, k))
    return Ranking(*(torch.cat([getattr(p, f) for p in parts]) for f in ("topk", "n_relevant", "first_rank")), k)


def ranking_metrics(r: Ranking, ks: tuple[int, ...] = KS, ndcg_k: int = NDCG_K) -> dict[str, float]:
    """``hit<k>`` and ``ndcg<k>`` (torchmetrics), ``recall<k>`` and ``mrr``, averaged over queries (0 for a
    query with nothing relevant).

    torchmetrics sees each query as a short ranked list: its top-k relevance flags, then as many relevant
    items as the ideal ranking needs beyond them (so nDCG's ideal DCG counts every relevant candidate),
    with strictly decreasing positive scores (our tie order is already applied; positive because
    torchmetrics 1.9's MRR/recall treat a candidate scoring <= 0 as not retrieved, and cosine scores can be
    negative — MRR is therefore computed here from the exact rank).
    """
    if max(*ks, ndcg_k) > r.k:
        raise ValueError(f"the ranking kept the top {r.k}; metrics @{max(*ks, ndcg_k)} need a larger k")
    Q = r.topk.shape[0]
    beyond = (r.n_relevant - r.topk.sum(1)).clamp(min=0, max=ndcg_k)
    tail = torch.arange(ndcg_k)[None, :] < beyond[:, None]
    target = torch.cat([r.topk, tail], 1)
    L = target.shape[1]
    preds = (L - torch.arange(L, dtype=torch.float)).repeat(Q)
    indexes = torch.arange(Q).repeat_interleave(L)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit{k}"] = float(RetrievalHitRate(top_k=k)(preds, target.flatten(), indexes=indexes))
    found = r.topk.long().cumsum(1)  # relevant candidates within the first j + 1 ranks
    for k in ks:
        within = found[:, min(k, found.shape[1]) - 1] if found.shape[1] else torch.zeros(Q, dtype=torch.long)
        out[f"recall{k}"] = float((within.double() / r.n_relevant.clamp(min=1).double()).mean()) if Q else 0.0
    out[f"ndcg{ndcg_k}"] = float(RetrievalNormalizedDCG(top_k=ndcg_k)(preds, target.flatten(), indexes=indexes))
    out["mrr"] = float((1.0 / r.first_rank).mean())
    return out


def retrieval_scores(scores: Tensor, relevant: Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Metrics of a score matrix in memory: ``hit<k>``, ``recall<k>``, ``ndcg10`` and ``mrr`` averaged over
    queries."""
    return ranking_metrics(rank_scores(scores, relevant, k=max(*ks, NDCG_K)), ks)


# ---------------------------------------------------------------------------------------------- pool, zero-shot
def pool_hit1(queries: Tensor, positives: Tensor, codes: Tensor, pool_size: int = 100,
              negatives: Tensor | None = None, seed: int = 0, query_chunk: int = 1024) -> float:
    """MMEB-style Hit@1: query ``i`` ranks its own positive ``positives[i]`` first among ``pool_size``
    candidates — its hard negatives ``negatives[i]`` (``[Q, K, D]``) and then distractors drawn (seeded,
    without replacement) from the positives of other labels. The positive wins ties (it is listed first)."""
    Q = len(queries)
    negs = negatives if negatives is not None else queries.new_zeros(Q, 0, queries.shape[1])
    n_draw = pool_size - 1 - negs.shape[1]
    if n_draw < 0:
        raise ValueError(f"pool_size {pool_size} is smaller than 1 + {negs.shape[1]} hard negatives")
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for i in range(0, Q, query_chunk):
        q, code = queries[i : i + query_chunk].float(), codes[i : i + query_chunk]
        other = code[:, None] != codes[None, :]
        available = int(other.sum(1).min())
        if available < n_draw:
            raise ValueError(f"pool_size {pool_size} needs {n_draw} distractors of other labels per query; "
                             f"only {available} exist (lower pool_size)")
        noise = torch.rand(other.shape, generator=g).masked_fill(~other, 2.0)
        draw = noise.topk(n_draw, dim=1, largest=False).indices  # n_draw random candidates of other labels
        pos = (q * positives[i : i + query_chunk].float()).sum(1)
        neg = torch.cat([torch.einsum("qd,qkd->qk", q, negs[i : i + query_chunk].float()),
                         torch.einsum("qd,qkd->qk", q, positives.float()[draw])], 1)
        hits += len(q) if neg.shape[1] == 0 else int((pos >= neg.max(1).values).sum())
    return hits / max(Q, 1)


def zero_shot_accuracy(media: Tensor, media_labels: list, prompts: Tensor, prompt_labels: list) -> float:
    """Share of media items whose nearest label prompt (ties: the earlier prompt) carries their label."""
    pred = (media.float() @ prompts.float().T).argmax(1)
    return sum(prompt_labels[int(p)] == lab for p, lab in zip(pred, media_labels)) / max(len(media_labels), 1)


# ---------------------------------------------------------------------------------------------- evaluation
def load_split(directory: str | Path, max_samples: int | None = None, skips: SkipCounter | None = None) -> list[dict]:
    """The first ``max_samples`` decoded samples of a shard set (all of them for ``None``), in shard order; corrupt
    samples are skipped and counted in ``skips``."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no shards at {directory} (the folder does not exist)")
    samples = []
    for s in iter_samples(str(directory), resampled=False, split_nodes=False, split_workers=False,
                          handler_skips=skips):
        samples.append(s)
        if max_samples is not None and len(samples) >= max_samples:
            break
    if not samples:
        raise ValueError(f"no samples in {directory}")
    return samples


@torch.no_grad()
def evaluate_samples(model, processor, samples: list[dict], batch_size: int = 64, pool_size: int = 100,
                     query_chunk: int = 1024, cand_chunk: int = 16384, progress: bool = True,
                     desc: str = "encode") -> dict[str, float]:
    """Every metric of :data:`METRICS` (that applies) on decoded samples of one modality."""
    was_training = model.training
    model.eval()
    n_negs = min(len(s.get("negs") or []) for s in samples)
    labels = [s.get("label") for s in samples]
    labelled = all(x is not None for x in labels)
    prompts_for = {}
    if labelled:
        for s in samples:
            prompts_for.setdefault(s["label"], s)
    total = len(samples) * (2 + n_negs) + len(prompts_for)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="item")

    def enc(items: list[dict], instructions: list[str] | None) -> Tensor:
        outs = []
        for i in range(0, len(items), batch_size):
            instr = None if instructions is None else instructions[i : i + batch_size]
            outs.append(model.encode(processor, items[i : i + batch_size], instr, batch_size))
            bar.update(len(items[i : i + batch_size]))
        return torch.cat(outs)

    try:
        q = enc([s["query"] for s in samples], [s["instruction"] for s in samples])
        c = enc([s["pos"] for s in samples], None)
        for side, e in (("query", q), ("candidate", c)):  # NaN compares false: it would rank first and score 1.0
            bad = int((~torch.isfinite(e)).any(dim=-1).sum())
            if bad:
                raise NonFiniteEmbeddings(f"{bad} of {len(e)} {samples[0].get('modality', '?')} {side} embeddings "
                                          "are not finite (NaN or inf): the model's weights or inputs are broken")
        negs = enc([n for s in samples for n in s["negs"][:n_negs]], None).view(len(samples), n_negs, -1) if n_negs else None
        prompts = enc([p["query"] for p in prompts_for.values()], [p["instruction"] for p in prompts_for.values()]) if labelled else None
    finally:
        bar.close()
        model.train(was_training)

    q_codes, c_codes = label_codes(labels, labels)
    out: dict[str, float] = {}
    for name, (a, b, ac, bc) in {"q2c": (q, c, q_codes, c_codes), "c2q": (c, q, c_codes, q_codes)}.items():
        ranking = rank_embeddings(a, b, ac, bc, query_chunk=query_chunk, cand_chunk=cand_chunk)
        out.update({f"{name}_{k}": v for k, v in ranking_metrics(ranking).items()})
    size = min(pool_size, n_negs + 1 + int((q_codes[:, None] != c_codes[None, :]).sum(1).min()))
    out["pool_hit1"] = pool_hit1(q, c, q_codes, size, negs, query_chunk=query_chunk)
    if labelled:
        out["zs_acc"] = zero_shot_accuracy(c, labels, prompts, list(prompts_for))
    out["n"] = len(samples)
    out["pool_size"] = size
    return out


class NonFiniteEmbeddings(ValueError):
    """A model produced NaN/inf embeddings: its metrics would be meaningless (NaN ranks first)."""


def evaluate_split(model, processor, directory: str | Path, batch_size: int = 64, progress: bool = True,
                   max_samples: int | None = None, **kwargs: Any) -> dict[str, float]:
    """:func:`evaluate_samples` of a shard set; ``skipped`` records how many corrupt samples were left out."""
    skips = SkipCounter()
    samples = load_split(directory, max_samples, skips)
    out = evaluate_samples(model, processor, samples, batch_size, progress=progress,
                           desc=f"encode {Path(directory).parent.name}", **kwargs)
    out["skipped"] = skips.count
    return out


def evaluate_model(model_dir: str | Path, data_root: str | Path, modalities: list[str] | None = None,
                   split: str = "eval", batch_size: int = 64, progress: bool = True,
                   **kwargs: Any) -> dict[str, dict[str, float]]:
    """Metrics per modality of a model directory on ``<data_root>/<modality>/<split>/``."""
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"data root {data_root} does not exist")
    available = [m for m in MODALITIES if split_dir(data_root, m, split).is_dir()]
    if not available:
        raise FileNotFoundError(f"no {split} shards under {data_root} (expected {data_root}/<modality>/{split}/)")
    modalities = list(modalities or available)
    missing = [m for m in modalities if m not in available]
    if missing:
        raise FileNotFoundError(f"no {split} shards for {missing} under {data_root} (found: {available or 'none'})")
    model, processor = load_model_and_processor(model_dir)
    out = {}
    for m in modalities:
        try:
            out[m] = evaluate_split(model, processor, split_dir(data_root, m, split), batch_size, progress, **kwargs)
        except NonFiniteEmbeddings as e:
            raise NonFiniteEmbeddings(f"model {model_dir}: {e}") from None
    return out


def format_table(rows: dict[str, dict[str, dict[str, float]]], metric: str = "q2c_hit1") -> str:
    """A markdown table: one row per model, one column per modality, cells = ``metric``."""
    mods = [m for m in MODALITIES if any(m in r for r in rows.values())]
    lines = ["| model | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
    for name, res in rows.items():
        cells = [f"{res[m][metric]:.3f}" if m in res and metric in res[m] else "–" for m in mods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_metrics(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of one model: rows = modalities, columns = every metric."""
    cols = [m for m in METRICS if any(m in r for r in results.values())]
    lines = ["| modality | " + " | ".join(cols) + " | n |", "|---|" + "---|" * (len(cols) + 1)]
    for mod, res in results.items():
        cells = [f"{res[c]:.3f}" if c in res else "–" for c in cols]
        lines.append(f"| {mod} | " + " | ".join(cells) + f" | {int(res.get('n', 0))} |")
    return "\n".join(lines)
