"""Evaluation: retrieval metrics and model evaluation (:mod:`.retrieval`), projector drift (:mod:`.drift`),
retrieval examples (:mod:`.examples`); the mteb adapter is :mod:`.mteb` (imported on demand: mteb is heavy)."""

from omni_lightning.evaluation.drift import (
    format_drift,
    load_pairs,
    measure_drift,
    projector_owner,
    sliced_w1,
)
from omni_lightning.evaluation.examples import (
    examples_for_model,
    load_pool,
    retrieval_examples,
)
from omni_lightning.evaluation.retrieval import (
    KS,
    METRICS,
    NDCG_K,
    RANKING_METRICS,
    Ranking,
    evaluate_model,
    evaluate_samples,
    evaluate_split,
    format_metrics,
    format_table,
    label_codes,
    load_split,
    pool_hit1,
    rank_embeddings,
    rank_scores,
    ranking_metrics,
    relevance,
    retrieval_scores,
    zero_shot_accuracy,
)

__all__ = ["KS", "METRICS", "NDCG_K", "RANKING_METRICS", "Ranking", "evaluate_model", "evaluate_samples",
           "evaluate_split",
           "format_metrics", "format_table", "label_codes", "load_split", "pool_hit1", "rank_embeddings", "rank_scores",
           "ranking_metrics", "relevance", "retrieval_scores", "zero_shot_accuracy", "examples_for_model", "format_drift", "load_pairs", "load_pool", "measure_drift",
           "projector_owner", "retrieval_examples", "sliced_w1"]
