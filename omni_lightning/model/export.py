"""Shareable folders: ``omni-lightning export MODEL_DIR --out DIR [--backbone_only] [--eval_results FILE]``.

The full export is a model directory that three loaders open, with no remote code:

* ``OmniEmbedder.from_pretrained(dir)`` (``omni_config.json`` + safetensors, as every model directory);
* ``AutoModel.from_pretrained(dir)`` / ``AutoProcessor.from_pretrained(dir)`` after ``import omni_lightning``
  (``config.json`` of model type ``omni_embedder``; ``processor_config.json`` names ``OmniEmbedderProcessor``);
* ``SentenceTransformer(dir)`` after ``import omni_lightning``: sentence-transformers' own ``Transformer`` module
  (``modules.json`` + ``sentence_bert_config.json``) loads the model and processor through those Auto classes and
  reads ``sentence_embedding`` from the model's output, for text, image, audio and video inputs.

``backbone_only`` writes the language+vision backbone alone as a plain checkpoint of its own architecture
(e.g. ``Qwen3VLModel``: ``AutoModel.from_pretrained(dir)`` without omni-lightning), with its processor.

Every export holds a model card (``README.md``): the recipe read from the omni config's history, the inputs'
hashes (each weight file's sha256, and the hashes fusion recorded), and the eval table when results are given.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from omni_lightning.model.config import CONFIG_NAME, OmniConfig
from omni_lightning.model.omni import OmniEmbedder, check_local_dir, weight_files

ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"}]
ST_MODALITIES = ("text", "image", "audio", "video")


def sentence_transformers_files(directory: Path, config: OmniConfig) -> None:
    """``modules.json``, ``sentence_bert_config.json`` and ``config_sentence_transformers.json``."""
    (directory / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
    method = {"method": "forward", "method_output_name": "sentence_embedding"}
    st = {"transformer_task": "feature-extraction", "module_output_name": "sentence_embedding",
          "modality_config": {m: dict(method) for m in ST_MODALITIES}}
    (directory / "sentence_bert_config.json").write_text(json.dumps(st, indent=2) + "\n")
    meta = {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
            "similarity_fn_name": "cosine"}
    (directory / "config_sentence_transformers.json").write_text(json.dumps(meta, indent=2) + "\n")


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _recipe_lines(history: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, h in enumerate(history, 1):
        step = h.get("step", "?")
        if step == "init-model":
            src = f"preset `{h['preset']}`" if h.get("preset") else f"backbone `{h.get('backbone')}` + audio encoder `{h.get('audio_encoder')}`"
            what = f"init-model: {src}, seed {h.get('seed')}"
        elif step == "fuse":
            coeffs = ", ".join(f"{k} {v}" for k, v in (h.get("coefficients") or {}).items())
            owners = ", ".join(f"{k} ← {v or 'base'}" for k, v in (h.get("owners") or {}).items())
            what = f"fuse: method `{h.get('method')}`, coefficients {coeffs or '–'}" + (f"; copied parts {owners}" if owners else "")
        else:
            parts = h.get("train_parts")
            lora = h.get("lora")
            what = f"{step}: from `{h.get('from', '?')}`, {h.get('global_step', '?')} steps, trained {parts or '–'}"
            if isinstance(lora, dict):
                what += f", LoRA r={lora.get('r')} on {lora.get('parts')}"
        lines.append(f"{i}. {what}")
    return lines


def _hash_lines(history: list[dict[str, Any]], files: dict[str, str]) -> list[str]:
    lines = [f"- `{name}`: sha256 `{digest}`" for name, digest in files.items()]
    for h in history:
        if h.get("step") == "fuse":
            base = h.get("base") or {}
            lines.append(f"- fusion input base `{base.get('path')}`: `{base.get('hash')}`")
            for s in h.get("specialists") or []:
                lines.append(f"- fusion input {s.get('name')} `{s.get('path')}`: `{s.get('hash')}`")
    return lines


def eval_table(results: dict[str, dict[str, float]]) -> str:
    from omni_lightning.evaluation.retrieval import format_metrics

    return format_metrics(results)


def model_card(config: OmniConfig, files: dict[str, str], eval_results: dict | None, backbone_only: bool,
               source: Path) -> str:
    kind = "the language+vision backbone" if backbone_only else "an omni-modal embedding model"
    text_cfg = config.backbone.get("text_config", {})
    lines = [
        "---",
        "library_name: " + ("transformers" if backbone_only else "sentence-transformers"),
        "tags: [omni-lightning, embedding" + ("" if backbone_only else ", sentence-transformers, feature-extraction") + "]",
        "---",
        f"# {source.name}",
        "",
        f"This folder holds {kind} trained with omni-lightning (specialists → task-vector fusion → audio projector "
        "recovery → rehearsal).",
        "",
        "## Architecture",
        "",
        f"- backbone: `{config.backbone_type}`, hidden {text_cfg.get('hidden_size')}, {text_cfg.get('num_hidden_layers')} layers",
    ]
    if not backbone_only:
        lines += [f"- audio encoder: `{config.audio_type}`, projector → {text_cfg.get('hidden_size')}",
                  f"- pooling: {config.pooling}-token, {'L2-normalised' if config.normalize else 'not normalised'}",
                  f"- prompt format: `{config.prompt_format}`" if hasattr(config, "prompt_format") else
                  f"- query template: `{config.query_template!r}`"]
    lines += ["", "## Recipe", "", *(_recipe_lines(config.history) or ["(no history recorded)"]), "",
              "## Inputs' hashes", "", *_hash_lines(config.history, files), ""]
    if eval_results:
        lines += ["## Evaluation", "", eval_table(eval_results), ""]
    lines += ["## Use", ""]
    if backbone_only:
        lines += ["```python", "from transformers import AutoModel, AutoProcessor",
                  f"model = AutoModel.from_pretrained({source.name!r})", "```",
                  "The audio tokens stay in the tokenizer and embedding; the audio encoder and projector are not part "
                  "of this folder."]
    else:
        lines += ["```python", "import omni_lightning.model  # registers the omni_embedder model type with transformers",
                  "from transformers import AutoModel, AutoProcessor",
                  f"model = AutoModel.from_pretrained({source.name!r})",
                  f"processor = AutoProcessor.from_pretrained({source.name!r})",
                  "emb = model(**processor(text=[\"a query\"])).sentence_embedding",
                  "",
                  "from sentence_transformers import SentenceTransformer",
                  f"st = SentenceTransformer({source.name!r})",
                  "st.encode([\"a text\"])                                   # text",
                  "st.encode([pil_image])                                   # images (PIL, HxWx3 arrays)",
                  "st.encode([{\"array\": waveform, \"sampling_rate\": 16000}])  # audio",
                  "```"]
    return "\n".join(lines) + "\n"


def export_model(model_dir: str | Path, out: str | Path, backbone_only: bool = False,
                 eval_results: str | Path | dict | None = None, overwrite: bool = False) -> Path:
    """Write a shareable folder from a model directory (see the module docstring)."""
    from omni_lightning.model.hf import mark_processor_class
    from omni_lightning.model.processor import OmniProcessor

    src = check_local_dir(model_dir, "model directory")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    if isinstance(eval_results, (str, Path)):
        eval_results = json.loads(Path(eval_results).read_text())
    files = {p.name: sha256(p) for p in weight_files(src)}
    model = OmniEmbedder.from_pretrained(src)
    processor = OmniProcessor.from_pretrained(src, model.config)
    if backbone_only:
        out.mkdir(parents=True)
        model.backbone.save_pretrained(str(out))
        processor.processor.save_pretrained(str(out))
    else:
        model.save_pretrained(out, processor=processor.processor)
        mark_processor_class(out)
        sentence_transformers_files(out, model.config)
    (out / "README.md").write_text(model_card(model.config, files, eval_results, backbone_only, out))
    return out


__all__ = ["export_model", "model_card", "sentence_transformers_files"]
