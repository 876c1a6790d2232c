"""Turn decoded items (text, image, document page, video frames, audio) into model inputs.

Every item becomes one sequence built from a template (``OmniConfig.query_template`` for queries, which
carries the task instruction, ``candidate_template`` otherwise). Media become placeholders:

* image / document page: ``<|vision_start|><|image_pad|><|vision_end|>``, expanded and pixel-processed by
  the backbone's own processor (Qwen3-VL's image processor);
* video (a ``[T, H, W, 3]`` frame stack): ``<|vision_start|><|video_pad|><|vision_end|>`` through the
  backbone's video path;
* audio: ``<|audio_start|>`` + ``n`` × ``<|audio_pad|>`` + ``<|audio_end|>``, where ``n`` is the number of
  tokens the audio tower will produce; the model writes the projected audio features over those ``n``
  placeholder embeddings.

Items are described by the dicts that :mod:`omni_lightning.data.schema` decodes: ``{"type": "text",
"text": ...}``, ``{"type": "image"|"document", "image": HxWx3 uint8}``, ``{"type": "video", "frames":
TxHxWx3 uint8}``, ``{"type": "audio", "waveform": float32 [n], "sample_rate": int}``. A media item may also
carry ``"text"`` (a mixed-media item: an image and a question, an audio clip and an instruction); its content
is the medium's placeholder, a newline, then the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from omni_lightning.modalities import MODALITIES as ITEM_TYPES
from omni_lightning.model.audio import LogMel, audio_token_count
from omni_lightning.model.config import AUDIO_TOKENS, OmniConfig
from omni_lightning.model.prompts import render_prompt

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


class OmniProcessor:
    """Wraps the backbone's processor (tokenizer + image + video processors) and the audio front end."""

    def __init__(self, config: OmniConfig, processor: Any) -> None:
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.logmel = LogMel(config.audio_features, pad_to_max=config.audio_type == "whisper")
        self.audio_start, self.audio_end, self.audio_pad = AUDIO_TOKENS

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: OmniConfig | None = None) -> "OmniProcessor":
        from transformers import AutoProcessor

        config = config or OmniConfig.load(directory)
        processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        # an exported directory names our AutoProcessor wrapper (model/hf.py): use the backbone processor it holds
        return cls(config, getattr(processor, "backbone_processor", processor))

    def save_pretrained(self, directory: str | Path) -> None:
        self.processor.save_pretrained(str(directory))

    # ------------------------------------------------------------------ text of one item
    def _content(self, item: dict[str, Any], audio_len: int | None) -> str:
        kind = item.get("type")
        if kind == "text":
            return str(item["text"])
        if kind in ("image", "document"):
            media = IMAGE_PLACEHOLDER
        elif kind == "video":
            media = VIDEO_PLACEHOLDER
        elif kind == "audio":
            n = audio_token_count(self.config, audio_len or 0)
            media = self.audio_start + self.audio_pad * n + self.audio_end
        else:
            raise ValueError(f"unknown item type {kind!r}; expected one of {ITEM_TYPES}")
        text = item.get("text")  # a mixed-media item: the medium, then its text (a question, an instruction)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"the text of a {kind} item must be a string, got {type(text).__name__}")
        return f"{media}\n{text}" if text else media

    def __call__(self, items: list[dict[str, Any]], instruction: str | list[str] | None = None) -> dict[str, Tensor]:
        """Model inputs for a list of items. ``instruction`` (one, or one per item) selects the query template."""
        if not items:
            raise ValueError("cannot process an empty list of items")
        if isinstance(instruction, str) or instruction is None:
            instructions = [instruction] * len(items)
        else:
            instructions = list(instruction)
            if len(instructions) != len(items):
                raise ValueError(f"{len(instructions)} instructions for {len(items)} items")

        audio_items = [it for it in items if it.get("type") == "audio"]
        audio: dict[str, Tensor] = {}
        audio_lens: list[int] = []
        if audio_items:
            feats, lens = self.logmel(
                [it["waveform"] for it in audio_items], [int(it["sample_rate"]) for it in audio_items]
            )
            audio = {"audio_features": feats, "audio_feature_lens": lens}
            audio_lens = lens.tolist()

        texts, images, videos, metadata = [], [], [], []
        a = 0
        for item, instr in zip(items, instructions):
            n = None
            if item.get("type") == "audio":
                n, a = audio_lens[a], a + 1
            content = self._content(item, n)
            texts.append(render_prompt(self.config, self.processor, content, instr))  # template or chat format
            if item.get("type") in ("image", "document"):
                images.append(_rgb(item["image"]))
            elif item.get("type") == "video":
                frames = np.array(item["frames"], dtype=np.uint8)
                if frames.ndim != 4 or frames.shape[-1] != 3:
                    raise ValueError(f"video frames must be [T, H, W, 3], got {frames.shape}")
                videos.append(frames)
                metadata.append(
                    {"fps": self.config.video_fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
                )

        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            kwargs["video_metadata"] = metadata
            kwargs["do_sample_frames"] = False
        out = self.processor(
            text=texts, padding=True, return_tensors="pt", return_mm_token_type_ids=True, **kwargs
        )
        batch = {k: v for k, v in out.items() if isinstance(v, Tensor)}
        batch.update(audio)
        return batch


def _rgb(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] (or [H, W]), got {arr.shape}")
    arr = arr.astype(np.uint8, copy=False)
    return arr if arr.flags.writeable else arr.copy()

