"""Projector Drift: measure how well the audio projector still speaks to the backbone it feeds.

After fusion the projector maps audio into the hidden space of the *audio specialist's* backbone, not the
fused one. :func:`measure_drift` quantifies that on audio–text eval pairs:

* **retrieval** — text→audio and audio→text hit@1 / hit@5 (kept as ``t2a_r1`` … ``a2t_r5``; relevant = same
  caption label); the number that drops after fusion and comes back after recovery;
* **where the projected audio tokens sit** relative to the backbone's input-embedding rows (the
  distribution the backbone was trained on):
  - ``norm_ratio`` — mean L2 norm of projected audio tokens / mean norm of embedding rows (1 = same scale);
  - ``sliced_w1`` — sliced 1-Wasserstein distance between the two point clouds, over 64 seeded random
    directions, each direction's distance divided by the embedding rows' spread along it (unitless;
    0 = same distribution, ~1 = shifted by a typical spread). Cheap: 64 projections and 1-D sorts;
* **agreement with a reference** (the audio specialist), when given — ``ref_cosine``: mean cosine between
  this model's audio embeddings and the reference's for the same clips.

:class:`~omni_lightning.callbacks.ProjectorDrift` runs it at fit start and after every validation (rank 0; logged as
``<phase>/drift/<metric>``); ``omni-lightning drift --model DIR [--reference DIR] --data ROOT`` prints it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from omni_lightning.data.shards import split_dir
from omni_lightning.evaluation.retrieval import load_split, relevance, retrieval_scores


def load_pairs(data_root: str | Path, split: str = "eval", max_samples: int = 256, modality: str = "audio") -> list[dict]:
    """The first ``max_samples`` decoded audio–text pairs of ``<data_root>/<modality>/<split>``."""
    d = split_dir(data_root, modality, split)
    out = load_split(d, max_samples)
    if any(s["pos"]["type"] != "audio" for s in out):
        raise ValueError(f"{d}: projector drift needs pairs whose positive is audio")
    return out


def projector_owner(config) -> str | None:
    """The directory of the specialist the projector was copied from, per the latest fusion record."""
    for record in reversed(config.history):
        if record.get("step") == "fuse":
            owner = record.get("owners", {}).get("projector")
            for spec in record.get("specialists", []):
                if spec.get("name") == owner and Path(spec.get("path", "")).is_dir():
                    return spec["path"]
            return None
    return None


def sliced_w1(x: Tensor, ref: Tensor, directions: int = 64, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between point clouds ``x`` and ``ref`` (``[n, D]``, ``[m, D]``): the mean
    over seeded random unit directions of the exact 1-D W1 between the projections, each divided by ``ref``'s
    standard deviation along that direction."""
    from scipy.stats import wasserstein_distance

    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], directions, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, pr = (x.double().cpu() @ dirs).numpy(), (ref.double().cpu() @ dirs).numpy()
    spread = pr.std(axis=0).clip(min=1e-12)
    return float(sum(wasserstein_distance(px[:, k], pr[:, k]) / spread[k] for k in range(directions)) / directions)


@torch.no_grad()
def measure_drift(model, processor, samples: list[dict], reference=None, reference_processor=None,
                  batch_size: int = 64) -> dict[str, float]:
    """The drift measures of the module docstring for one model (eval mode is set and restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        texts = [s["query"] for s in samples]
        audios = [s["pos"] for s in samples]
        q = model.encode(processor, texts, [s["instruction"] for s in samples], batch_size=batch_size)
        a = model.encode(processor, audios, None, batch_size=batch_size)
        labels = [s.get("label") for s in samples]
        rel = relevance(labels, labels)
        t2a, a2t = retrieval_scores(q @ a.T, rel), retrieval_scores(a @ q.T, rel.T)
        # t2a_r1 etc. are hit@k (a relevant clip in the top k), kept under their historic names here
        out = {"t2a_r1": t2a["hit1"], "t2a_r5": t2a["hit5"], "a2t_r1": a2t["hit1"], "a2t_r5": a2t["hit5"]}

        device = next(model.parameters()).device
        tokens = []
        for i in range(0, len(audios), batch_size):
            feats = processor.logmel([x["waveform"] for x in audios[i : i + batch_size]],
                                     [int(x["sample_rate"]) for x in audios[i : i + batch_size]])
            tokens.append(model.embed_audio(feats[0].to(device), feats[1].to(device)).float().cpu())
        audio_tokens = torch.cat(tokens)
        rows = model.backbone.get_input_embeddings().weight[: model.config.base_vocab_size or None].float().cpu()
        out["norm_ratio"] = float(audio_tokens.norm(dim=-1).mean() / rows.norm(dim=-1).mean())
        out["sliced_w1"] = sliced_w1(audio_tokens, rows)
        if reference is not None:
            ref_modes = {m: m.training for m in reference.modules()}
            reference.eval()
            try:
                r = reference.encode(reference_processor or processor, audios, None, batch_size=batch_size)
            finally:
                for m, t in ref_modes.items():
                    m.train(t)
            out["ref_cosine"] = float((a * r).sum(-1).mean())
        return out
    finally:
        for m, t in modes.items():
            m.train(t)


def format_drift(rows: dict[str, dict[str, float]]) -> str:
    keys = ["t2a_r1", "t2a_r5", "a2t_r1", "a2t_r5", "norm_ratio", "sliced_w1", "ref_cosine"]
    keys = [k for k in keys if any(k in r for r in rows.values())]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in keys) + " |")
    return "\n".join(lines)
