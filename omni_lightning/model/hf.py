"""transformers Auto classes for omni-lightning model directories (no remote code).

``import omni_lightning`` registers three classes with transformers' Auto machinery:

* :class:`OmniEmbedderConfig` (``model_type = "omni_embedder"``) with ``AutoConfig``;
* :class:`OmniEmbedderModel`, a ``PreTrainedModel`` around :class:`~omni_lightning.model.omni.OmniEmbedder`, with
  ``AutoModel``: ``AutoModel.from_pretrained(dir)(**inputs).sentence_embedding`` is the embedding;
* :class:`OmniEmbedderProcessor`, a ``ProcessorMixin`` around :class:`~omni_lightning.model.processor.OmniProcessor`,
  with ``AutoProcessor``: it takes our item dicts (``items=[{"type": "audio", ...}]``) or the ecosystem's
  ``text= / images= / audio= / videos=`` lists (what sentence-transformers passes).

A directory needs a ``config.json`` of model type ``omni_embedder`` for ``AutoModel`` (every model directory that
:meth:`OmniEmbedder.save_pretrained` writes has one; ``omni-lightning export`` writes one too) and, for
``AutoProcessor`` to pick the omni processor, ``"processor_class": "OmniEmbedderProcessor"`` in
``processor_config.json`` (written by ``omni-lightning export``). Weights are the model directory's safetensors,
loaded by our own loader; ``omni_config.json`` is the source of truth where it exists (``config.json`` carries a
copy of it, so ``AutoModel.from_config`` works too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, PreTrainedModel
from transformers.processing_utils import ProcessorMixin
from transformers.utils import ModelOutput

from omni_lightning.model.config import (
    CONFIG_NAME,
    HF_CONFIG_NAME,
    MODEL_TYPE,
    OmniConfig,
    OmniEmbedderConfig,
    write_hf_config,
)
from omni_lightning.model.omni import OmniEmbedder, check_local_dir
from omni_lightning.model.processor import OmniProcessor

PROCESSOR_CONFIG_NAME = "processor_config.json"

_BACKBONE_PROCESSORS = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


@dataclass
class OmniEmbedderOutput(ModelOutput):
    """``sentence_embedding [B, D]``: L2-normalised (unless the omni config says otherwise)."""

    sentence_embedding: torch.FloatTensor | None = None


class OmniEmbedderModel(PreTrainedModel):
    """``OmniEmbedder`` as a transformers model. Its state dict is the ``OmniEmbedder``'s (``backbone.*``,
    ``audio_encoder.*``, ``projector.*``): the parts are registered directly on this module."""

    config_class = OmniEmbedderConfig
    base_model_prefix = "omni"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    def __init__(self, config: OmniEmbedderConfig, embedder=None) -> None:
        super().__init__(config)
        if embedder is None:
            if not config.omni:
                raise ValueError("an OmniEmbedderConfig without its omni config (config.omni) cannot build a model")
            embedder = OmniEmbedder(OmniConfig(**config.omni))
        self.backbone = embedder.backbone
        self.audio_encoder = embedder.audio_encoder
        self.projector = embedder.projector
        self.__dict__["embedder"] = embedder  # shares the parts above; not a second registration

    def _init_weights(self, module) -> None:  # weights always come from a model directory
        pass

    @property
    def omni_config(self) -> OmniConfig:
        return self.embedder.config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: OmniEmbedderConfig | None = None,
                        dtype: Any = None, torch_dtype: Any = None, device_map: Any = None, **kwargs):
        """Load a local model directory with our own loader (safetensors, bit-exact); ``dtype`` and a single-device
        ``device_map`` are honoured, hub options are ignored (nothing is ever downloaded)."""
        directory = check_local_dir(pretrained_model_name_or_path, "model directory")
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype):
            dtype = None
        embedder = OmniEmbedder.from_pretrained(directory, dtype=dtype)
        if (directory / CONFIG_NAME).is_file() or config is None:
            config = OmniEmbedderConfig.from_omni(embedder.config)
        model = cls(config, embedder=embedder)
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            model = model.to(device_map)
        return model.eval()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:  # the omni layout, not transformers'
        self.embedder.save_pretrained(save_directory)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                audio_feature_lens: torch.Tensor | None = None, return_dict: bool | None = None):
        given = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                     image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                     video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
                     second_per_grid_ts=second_per_grid_ts, audio_features=audio_features,
                     audio_feature_lens=audio_feature_lens)
        device = next(self.parameters()).device
        batch = {k: v.to(device) for k, v in given.items() if v is not None}
        emb = self.embedder(batch)
        return OmniEmbedderOutput(sentence_embedding=emb) if return_dict is not False else (emb,)


class OmniEmbedderProcessor(ProcessorMixin):
    """:class:`OmniProcessor` behind the ``ProcessorMixin`` interface.

    Call it with ``items`` (our dicts, see :mod:`omni_lightning.model.processor`) and an optional ``instruction``,
    or with one of ``text`` / ``images`` / ``audio`` / ``videos`` (lists; one item per element; ``audio`` at
    ``sampling_rate`` from ``audio_kwargs`` or the keyword, default the model's rate). Texts get the candidate
    template; an ``instruction`` selects the query template."""

    attributes: list[str] = []

    def __init__(self, omni_processor) -> None:  # noqa: D401 - no sub-processor bookkeeping of ProcessorMixin
        self.omni = omni_processor
        self.backbone_processor = omni_processor.processor
        self.tokenizer = omni_processor.tokenizer
        self.chat_template = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "OmniEmbedderProcessor":
        import transformers


        directory = check_local_dir(pretrained_model_name_or_path, "model directory")
        config = OmniConfig.load(directory)
        backbone_cls = getattr(transformers, _BACKBONE_PROCESSORS[config.backbone_type])
        backbone = backbone_cls.from_pretrained(str(directory), local_files_only=True)
        return cls(OmniProcessor(config, backbone))

    def save_pretrained(self, save_directory, *args, **kwargs) -> list[str]:
        self.omni.save_pretrained(save_directory)
        mark_processor_class(save_directory)
        return []

    def __repr__(self) -> str:
        return f"OmniEmbedderProcessor(backbone={type(self.backbone_processor).__name__})"

    def __call__(self, text=None, images=None, audio=None, videos=None, *, items: list[dict] | None = None,
                 instruction: str | list[str] | None = None, sampling_rate: int | None = None,
                 audio_kwargs: dict | None = None, videos_kwargs: dict | None = None, **_: Any):
        if items is None:
            items = _items_from_lists(text, images, audio, videos, sampling_rate or (audio_kwargs or {}).get(
                "sampling_rate") or self.omni.config.audio_features.sampling_rate)
        return self.omni(list(items), instruction)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _frames(video) -> np.ndarray:
    arr = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(
        [np.asarray(f) for f in video] if isinstance(video, (list, tuple)) else video)
    if arr.ndim == 4 and arr.shape[-1] != 3 and arr.shape[1] == 3:  # [T, C, H, W] -> [T, H, W, C]
        arr = arr.transpose(0, 2, 3, 1)
    return arr


def _items_from_lists(text, images, audio, videos, sampling_rate: int) -> list[dict]:
    given = [k for k, v in (("text", text), ("images", images), ("audio", audio), ("videos", videos)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"OmniEmbedderProcessor takes one input kind per call (one item per element), got {given or 'none'}"
                         "; pass items=[...] for a batch of mixed kinds")
    if text is not None:
        return [{"type": "text", "text": t} for t in _as_list(text)]
    if images is not None:
        return [{"type": "image", "image": np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)}
                for im in _as_list(images)]
    if audio is not None:
        wavs = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else _as_list(audio)
        out = []
        for w in wavs:
            w = w.numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
            out.append({"type": "audio", "waveform": (w.mean(0) if w.ndim == 2 else w).astype(np.float32),
                        "sample_rate": int(sampling_rate)})
        return out
    return [{"type": "video", "frames": _frames(v)} for v in _as_list(videos)]


def mark_processor_class(directory: str | Path) -> None:
    """Point ``processor_config.json`` at :class:`OmniEmbedderProcessor`, so ``AutoProcessor`` picks it."""
    path = Path(directory) / PROCESSOR_CONFIG_NAME
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["processor_class"] = OmniEmbedderProcessor.__name__
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def register() -> None:
    """Register the config, model and processor with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, OmniEmbedderConfig, exist_ok=True)
    AutoModel.register(OmniEmbedderConfig, OmniEmbedderModel, exist_ok=True)
    AutoProcessor.register(OmniEmbedderConfig, OmniEmbedderProcessor, exist_ok=True)


__all__ = ["HF_CONFIG_NAME", "MODEL_TYPE", "OmniEmbedderConfig", "OmniEmbedderModel", "OmniEmbedderOutput", "OmniEmbedderProcessor",
           "mark_processor_class", "register", "write_hf_config"]
