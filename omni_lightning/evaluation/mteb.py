"""An omni-lightning model directory as an mteb 2.x encoder — ``omni-lightning mteb``.

:class:`OmniMtebEncoder` implements mteb's encoder protocol around :meth:`OmniEmbedder.encode`:
``encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)``.
Each row of a batch becomes one item of the processor (:mod:`omni_lightning.model.processor`):

* text → ``{"type": "text"}``; an image (PIL) → ``{"type": "image"}``; audio ``{array, sampling_rate}`` →
  ``{"type": "audio"}``; video frames (torchcodec ``[T, C, H, W]``) → ``{"type": "video"}``;
* a row with text *and* one medium (an image and a question, audio and an instruction) → a mixed-media item,
  the medium with its ``"text"``. A row with two media (video and audio) is refused with a clear error.

mteb's own collators are attached to the loader at the model's sampling rate: ``AudioCollator`` (resampling,
capped at the model's ``max_seconds``) for audio, ``VideoCollator`` (frames at ``fps``, at most
``max_frames``, at least ``min_frames``) for video.

**Instructions.** Queries carry an instruction (the query template), candidates none (the candidate
template), as in training and in ``omni-lightning eval``. The query instruction is, first found:
a user prompt (``prompts``, e.g. from a YAML) under mteb's keys — ``<task>-query``, ``<task>``,
``<task type>-query``, ``<task type>``, ``query`` (mteb's own priority order); the task's own
``metadata.prompt``; a default for the task's category (:data:`DEFAULT_INSTRUCTIONS`, e.g. ``t2a``) or
type; then :data:`FALLBACK_INSTRUCTION`. A candidate gets an instruction only from an explicit
``<task>-document`` / ``<task type>-document`` prompt. Tasks without a query side (classification,
clustering: ``prompt_type`` is ``None``) are encoded as queries.

**The model meta.** :func:`model_meta` gives a :class:`mteb.ModelMeta` whose loader takes the *local*
model folder through ``loader_kwargs`` (mteb passes ``ModelMeta.name`` as the first argument, which is a
display name here, never a hub id); its revision is a digest of the folder's config and weight files, so a
changed model never reuses stale cached results.

:func:`run_mteb` runs tasks or a benchmark offline from the local datasets cache (``download=True`` lifts
that), writes mteb's results under ``<out>/results/`` and a summary (``summary.md``, ``summary.json``) of
the main score per task and their mean. :func:`shard_retrieval_task` turns an eval shard set into a local
mteb retrieval task (text → media, relevant = same label), the bridge between ``omni-lightning eval`` and
mteb.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mteb
import numpy as np
import torch
import yaml
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.modality_collators import AudioCollator, VideoCollator
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from tqdm.auto import tqdm

from omni_lightning.evaluation.retrieval import load_split
from omni_lightning.utils import atomic_write_text

logger = logging.getLogger(__name__)

MTEB_VERSION = mteb.__version__
# Query instructions per mteb task category (retrieval) or task type; override them with ``prompts``.
DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "t2t": "Retrieve a text that answers or matches the given text.",
    "t2i": "Retrieve the image that matches the description.",
    "i2t": "Retrieve the text that describes the image.",
    "it2t": "Retrieve the text that answers the question about the image.",
    "it2i": "Retrieve the image that matches the image and the text.",
    "t2it": "Retrieve the image and text that match the description.",
    "it2it": "Retrieve the image and text that match the image and the text.",
    "i2i": "Retrieve an image similar to the given image.",
    "t2a": "Retrieve the audio clip that matches the description.",
    "a2t": "Retrieve the text that describes the audio clip.",
    "a2a": "Retrieve an audio clip similar to the given audio clip.",
    "t2v": "Retrieve the video clip that matches the description.",
    "v2t": "Retrieve the text that describes the video clip.",
    "v2v": "Retrieve a video clip similar to the given video clip.",
    "AudioClassification": "Represent the audio clip for classifying what it contains.",
    "AudioMultilabelClassification": "Represent the audio clip for classifying what it contains.",
    "AudioClustering": "Represent the audio clip for grouping it with similar sounds.",
    "AudioPairClassification": "Represent the audio clip for deciding whether two clips match.",
    "AudioReranking": "Retrieve the audio clip that matches the query.",
    "AudioZeroshotClassification": "Represent the audio clip for classifying what it contains.",
    "ImageClassification": "Represent the image for classifying what it shows.",
    "ImageClustering": "Represent the image for grouping it with similar images.",
    "VideoClassification": "Represent the video clip for classifying what it shows.",
    "VideoClustering": "Represent the video clip for grouping it with similar clips.",
}
FALLBACK_INSTRUCTION = "Represent the input for retrieval."
_MEDIA = ("image", "video", "audio")


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(path: str | os.PathLike | None) -> dict[str, str]:
    """Instructions from a YAML mapping ``key: instruction`` (keys as in the module docstring)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"prompts file {p} must be a YAML mapping of strings (task name, task type, "
                         "'<task>-query', 'query', ... → instruction)")
    return dict(data)


def instruction_for(prompts: Mapping[str, str], task_metadata: TaskMetadata,
                    prompt_type: PromptType | None) -> str | None:
    """The instruction for one side of a task (``None``: the candidate template)."""
    if prompt_type == PromptType.document:
        for key in (f"{task_metadata.name}-document", f"{task_metadata.type}-document"):
            if key in prompts:
                return prompts[key]
        return None
    query_prompts = {k: v for k, v in prompts.items() if not k.endswith("-document") and k != "document"}
    key = get_prompt_name(query_prompts, task_metadata, PromptType.query) if query_prompts else None
    if key is not None:
        return query_prompts[key]
    own = task_metadata.prompt
    if isinstance(own, Mapping):
        own = own.get(PromptType.query.value)
    if own:
        return str(own)
    for key in (task_metadata.category, task_metadata.type):
        if key in DEFAULT_INSTRUCTIONS:
            return DEFAULT_INSTRUCTIONS[key]
    return FALLBACK_INSTRUCTION


# ---------------------------------------------------------------------------------------------- batch → items
def _image(x: Any) -> np.ndarray:
    if hasattr(x, "convert"):  # PIL
        return np.asarray(x.convert("RGB"), dtype=np.uint8)
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW → HWC
    return arr.astype(np.uint8, copy=False)


def _frames(x: Any) -> np.ndarray:
    arr = x.data if hasattr(x, "data") and not isinstance(x, (np.ndarray, torch.Tensor)) else x  # FrameBatch
    arr = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if arr.ndim != 4:
        raise ValueError(f"video frames must be 4-D ([T, C, H, W] or [T, H, W, C]), got shape {arr.shape}")
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # torchcodec's [T, C, H, W] → [T, H, W, C]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _audio(x: Any, sampling_rate: int) -> dict[str, Any]:
    if isinstance(x, Mapping):
        wav, sr = x["array"], int(x.get("sampling_rate") or sampling_rate)
    else:
        wav, sr = x, sampling_rate
    wav = wav.numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    wav = wav.astype(np.float32, copy=False)
    if wav.ndim == 2:  # channels first (mteb's collator keeps [C, n] for one channel)
        wav = wav.mean(axis=0)
    return {"type": "audio", "waveform": np.ascontiguousarray(wav), "sample_rate": sr}


def batch_items(batch: Mapping[str, Any], sampling_rate: int, task: str = "?") -> list[dict[str, Any]]:
    """The processor items of one collated mteb batch (rows in order)."""
    n = max((len(v) for k, v in batch.items() if k in ("text", *_MEDIA) and v is not None), default=0)
    if n == 0:
        raise ValueError(f"task {task}: a batch without text, image, audio or video (keys: {sorted(batch)})")
    items = []
    for i in range(n):
        def col(k):
            v = batch.get(k)
            return v[i] if v is not None and i < len(v) else None

        media = [m for m in _MEDIA if col(m) is not None]
        text = col("text")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"task {task}: row {i} has a non-string text ({type(text).__name__})")
        if len(media) > 1:
            raise ValueError(f"task {task}: row {i} carries {' and '.join(media)}; an item holds one medium "
                             "(plus text) — tasks with video and audio together are not supported")
        if not media:
            items.append({"type": "text", "text": text or ""})
            continue
        m = media[0]
        if m == "image":
            item = {"type": "image", "image": _image(col("image"))}
        elif m == "video":
            item = {"type": "video", "frames": _frames(col("video"))}
        else:
            item = _audio(col("audio"), sampling_rate)
        if text:
            item["text"] = text
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------- the encoder
class OmniMtebEncoder(AbsEncoder):
    """mteb's encoder protocol around an omni-lightning model directory.

    Args:
        model_name: mteb's display name (``ModelMeta.name``); the weights come from ``model_dir``.
        revision: ignored (the model folder is what it is).
        model_dir: the local model directory (``omni-lightning init-model`` / a phase's export).
        device: ``cuda`` when available, else ``cpu``, unless given.
        prompts: instructions (module docstring); ``prompts_file``: a YAML of them (``prompts`` wins).
        batch_size: items per forward (mteb's ``encode_kwargs['batch_size']`` sizes the loader's batches).
        fps / max_frames / min_frames: video frame sampling (default: the model's ``video_fps``).
    """

    def __init__(self, model_name: str | None = None, revision: str | None = None, *, model_dir: str,
                 device: str | None = None, prompts: Mapping[str, str] | None = None,
                 prompts_file: str | None = None, batch_size: int = 32, fps: float | None = None,
                 max_frames: int | None = 32, min_frames: int = 2, dtype: str | None = None,
                 **kwargs: Any) -> None:
        from omni_lightning.model.omni import load_model_and_processor

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist (a local folder is required)")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.model, self.processor = load_model_and_processor(model_dir, dtype=torch_dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.model_dir = str(model_dir)
        self.prompts = {**load_prompts(prompts_file), **dict(prompts or {})}
        self.batch_size = batch_size
        cfg = self.model.config
        self.sampling_rate = int(cfg.audio_features.sampling_rate)
        self.max_samples = int(cfg.audio_features.max_seconds * self.sampling_rate)
        self.fps = cfg.video_fps if fps is None else fps
        self.max_frames, self.min_frames = max_frames, min_frames

    def _attach_collator(self, inputs) -> None:
        features = getattr(inputs.dataset, "features", None) or {}
        if "video" in features:
            inputs.collate_fn = VideoCollator(target_sampling_rate=self.sampling_rate, fps=self.fps,
                                              max_frames=self.max_frames, min_frames=self.min_frames,
                                              max_samples=self.max_samples)
        elif "audio" in features:
            inputs.collate_fn = AudioCollator(target_sampling_rate=self.sampling_rate, max_samples=self.max_samples)

    @torch.no_grad()
    def encode(self, inputs, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        self._attach_collator(inputs)
        instruction = instruction_for(self.prompts, task_metadata, prompt_type)
        show = bool(kwargs.get("show_progress_bar", True))
        side = prompt_type.value if prompt_type is not None else "items"
        outs = []
        for batch in tqdm(inputs, desc=f"{task_metadata.name} {side}", disable=not show, leave=False):
            items = batch_items(batch, self.sampling_rate, task_metadata.name)
            outs.append(self.model.encode(self.processor, items, instruction, self.batch_size).float())
        if not outs:
            raise ValueError(f"task {task_metadata.name}: nothing to encode ({hf_subset}/{hf_split}, {side})")
        return torch.cat(outs).numpy()


def model_revision(model_dir: str | os.PathLike) -> str:
    """A short digest of the folder's config and weight files (names, sizes, modification times)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def model_meta(model_dir: str | os.PathLike, name: str | None = None, **loader_kwargs: Any) -> ModelMeta:
    """An mteb ``ModelMeta`` for a local model directory; ``loader_kwargs`` go to :class:`OmniMtebEncoder`."""
    root = Path(model_dir)
    if not (root / "omni_config.json").is_file():
        raise FileNotFoundError(f"{root} is not an omni-lightning model directory (no omni_config.json)")
    return ModelMeta(
        loader=OmniMtebEncoder,
        loader_kwargs={"model_dir": str(root.resolve()), **loader_kwargs},
        name=name or f"omni-lightning/{root.resolve().name}",
        revision=model_revision(root),
        release_date=None, languages=None, n_parameters=None, memory_usage_mb=None, max_tokens=None,
        embed_dim=None, license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch", "safetensors"], similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
        training_datasets=None, adapted_from=None, superseded_by=None,
        modalities=["text", "image", "audio", "video"], model_type=["dense"],
    )


# ---------------------------------------------------------------------------------------------- shards → task
def shard_retrieval_task(directory: str | os.PathLike, name: str | None = None,
                         max_samples: int | None = None) -> AbsTaskRetrieval:
    """A local mteb retrieval task from an eval shard set: every sample's query (text) against every
    sample's positive (image, document page or audio), relevant = same ``label`` (or the own pair without
    labels) — the ``q2c`` direction of ``omni-lightning eval``. The shards' instruction becomes the task's
    query prompt. Video shards are refused (mteb hands videos over as encoded files, and re-encoding the
    frames would change them)."""
    from datasets import Audio, Dataset, Image

    samples = load_split(directory, max_samples)
    kinds = {s["pos"]["type"] for s in samples}
    if any(s["query"]["type"] != "text" or "text" in s["pos"] for s in samples) or len(kinds) != 1:
        raise ValueError(f"{directory}: shard_retrieval_task needs text queries and one kind of plain media "
                         f"positive (found positives {sorted(kinds)})")
    kind = kinds.pop()
    if kind not in ("image", "document", "audio"):
        raise ValueError(f"{directory}: positives of type {kind!r} cannot become an mteb task here "
                         "(supported: image, document, audio)")
    instructions = {s["instruction"] for s in samples}
    if len(instructions) != 1:
        raise ValueError(f"{directory}: the samples carry {len(instructions)} instructions; one task needs one")
    labels = [s.get("label") for s in samples]
    labelled = all(x is not None for x in labels)
    qids = [f"q{i:06d}" for i in range(len(samples))]
    dids = [f"d{i:06d}" for i in range(len(samples))]
    qrels = {q: {d: 1 for j, d in enumerate(dids) if (labels[i] == labels[j] if labelled else i == j)}
             for i, q in enumerate(qids)}
    queries = Dataset.from_dict({"id": qids, "text": [s["query"]["text"] for s in samples]})
    if kind == "audio":
        col = "audio"
        corpus = Dataset.from_dict({"id": dids, "audio": [
            {"array": s["pos"]["waveform"], "sampling_rate": s["pos"]["sample_rate"]} for s in samples]})
        corpus = corpus.cast_column("audio", Audio())
    else:
        from PIL import Image as PILImage

        col = "image"
        corpus = Dataset.from_dict({"id": dids, "image": [PILImage.fromarray(s["pos"]["image"]) for s in samples]})
        corpus = corpus.cast_column("image", Image())
    task_name = name or f"OmniShards_{Path(directory).parent.name}_{Path(directory).name}"
    category = {"audio": "t2a", "image": "t2i", "document": "t2i"}[kind]
    metadata = TaskMetadata(
        name=task_name, description=f"omni-lightning shards at {directory} (text → {kind})",
        reference=None, dataset={"path": str(directory), "revision": "local"}, type="Any2AnyRetrieval",
        category=category, modalities=["text", col], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
        prompt={"query": instructions.pop()},
    )

    class ShardRetrievalTask(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {"test": {"queries": queries, "corpus": corpus, "relevant_docs": qrels,
                                                 "top_ranked": None}}}
            self.data_loaded = True

    ShardRetrievalTask.metadata = metadata
    ShardRetrievalTask.__name__ = task_name
    return ShardRetrievalTask()


# ---------------------------------------------------------------------------------------------- running
def resolve_tasks(tasks: Iterable[str | Any] | None = None, benchmark: str | None = None) -> list[Any]:
    """mteb task objects from names (or task objects) or one benchmark name; exactly one of the two."""
    if bool(tasks) == bool(benchmark):
        raise ValueError("give either --tasks or --benchmark (one of them)")
    if benchmark:
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as e:
            near = [b.name for b in mteb.get_benchmarks()
                    if any(w in b.name for w in ("MAEB", "MIEB", "MVEB", "ViDoRe"))]
            raise ValueError(f"mteb {MTEB_VERSION} has no benchmark {benchmark!r} ({e}); multimodal ones it has: "
                             f"{', '.join(near)}. Pass the tasks you want with --tasks instead.") from None
    out = []
    for t in tasks:
        if not isinstance(t, str):
            out.append(t)
            continue
        try:
            out.append(mteb.get_task(t))
        except (KeyError, ValueError) as e:
            raise ValueError(f"mteb {MTEB_VERSION} has no task {t!r}: {e}") from None
    return out


def _set_offline(offline: bool) -> None:
    """HF_HUB_OFFLINE for huggingface_hub and datasets (both read it at import time)."""
    value = "1" if offline else "0"
    os.environ["HF_HUB_OFFLINE"] = value
    os.environ["HF_DATASETS_OFFLINE"] = value
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    datasets.config.HF_HUB_OFFLINE = offline
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = offline


def main_score(task_result: Any) -> float:
    """The task's main score (mean over its evaluated splits and subsets, as mteb aggregates it)."""
    return float(task_result.get_score())


def summarize(rows: list[dict[str, Any]], benchmark: str | None) -> dict[str, Any]:
    scores = [r["score"] for r in rows if r.get("score") is not None]
    done = len(scores) == len(rows)
    return {"mteb_version": MTEB_VERSION, "benchmark": benchmark, "tasks": rows,
            "mean": (sum(scores) / len(scores)) if scores else None, "complete": done,
            "n_tasks": len(rows), "n_scored": len(scores)}


def format_summary(summary: dict[str, Any], model: str) -> str:
    title = summary["benchmark"] or "tasks"
    lines = [f"# {model} on {title} (mteb {summary['mteb_version']})", "",
             "| task | type | main score | value |", "|---|---|---|---|"]
    for r in summary["tasks"]:
        value = f"{r['score']:.4f}" if r.get("score") is not None else f"failed: {r.get('error', '?')}"
        lines.append(f"| {r['task']} | {r['type']} | {r['main_score']} | {value} |")
    mean = summary["mean"]
    note = "" if summary["complete"] else f" (over {summary['n_scored']} of {summary['n_tasks']} tasks)"
    lines += ["", f"**Mean of the main scores: {'–' if mean is None else f'{mean:.4f}'}**{note}", ""]
    return "\n".join(lines)


def run_mteb(model: str | os.PathLike, out: str | os.PathLike, tasks: Iterable[str | Any] | None = None,
             benchmark: str | None = None, prompts: str | os.PathLike | None = None, batch_size: int = 32,
             device: str | None = None, download: bool = False, overwrite: str = "only-missing",
             progress: bool = True, raise_error: bool = False, **loader_kwargs: Any) -> dict[str, Any]:
    """Evaluate a model directory on mteb tasks; returns the summary (also written under ``out``).

    Datasets come from the local datasets cache (``HF_HOME`` / ``HF_DATASETS_CACHE``); ``download=True``
    allows fetching them. Results go to ``<out>/results/`` in mteb's format (a rerun reuses finished tasks:
    ``overwrite="only-missing"``), predictions nowhere. A task that fails is listed with its error in the
    summary (``raise_error=True`` stops at the first instead).
    """
    _set_offline(not download)
    task_objs = resolve_tasks(tasks, benchmark)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model, prompts_file=str(prompts) if prompts else None, batch_size=batch_size,
                      **loader_kwargs)
    encoder = meta.load_model(device=device)
    cache = mteb.ResultCache(cache_path=out)
    rows = []
    bar = tqdm(task_objs, desc="mteb tasks", unit="task", disable=not progress)
    for task in bar:
        md = task.metadata
        bar.set_postfix_str(md.name)
        row = {"task": md.name, "type": md.type, "main_score": md.main_score, "score": None}
        try:
            result = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy=overwrite,
                                   encode_kwargs={"batch_size": batch_size, "show_progress_bar": progress},
                                   show_progress_bar=False, raise_error=True)
            task_result = result.task_results[0]
            row["score"] = main_score(task_result)
        except Exception as e:  # noqa: BLE001 - one failed task must not lose a benchmark's other results
            if raise_error:
                raise
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if not download and "offline" in msg.lower():
                cache_dir = os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
                msg = (f"dataset {md.dataset.get('path')} is not in the local datasets cache ({cache_dir}): "
                       f"fill the cache where there is network (--download true), or copy it here [{msg}]")
            logger.error("mteb task %s failed: %s", md.name, msg)
            row["error"] = msg
        if row["score"] is not None and not math.isfinite(row["score"]):
            row["error"], row["score"] = f"non-finite score {row['score']}", None
        rows.append(row)
    summary = summarize(rows, benchmark)
    summary["model"] = str(model)
    summary["revision"] = meta.revision
    summary["results_dir"] = str(out / "results")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", format_summary(summary, str(model)))
    return summary


__all__ = ["DEFAULT_INSTRUCTIONS", "FALLBACK_INSTRUCTION", "MTEB_VERSION", "OmniMtebEncoder", "batch_items",
           "format_summary", "instruction_for", "load_prompts", "main_score", "model_meta", "model_revision",
           "resolve_tasks", "run_mteb", "shard_retrieval_task", "summarize"]
