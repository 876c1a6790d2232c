"""The omni config: what a model directory holds and which tensors belong to which part.

A model directory is self-describing::

    omni_config.json                       this config (architecture, parts, prefixes, tokens, templates)
    model.safetensors                      weights, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json  the backbone tokenizer with the audio tokens added
    processor_config.json / *.json         the backbone's image and video processor settings

Tensor names are those of :class:`OmniEmbedder`'s ``state_dict``; each part owns the tensors under its prefix
(``PART_PREFIXES``). Fusion uses this map to tell shared tensors from tensors a specialist added.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

FORMAT = "omni-lightning/1"
CONFIG_NAME = "omni_config.json"

AUDIO_TOKENS = ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")

# part name -> tensor-name prefix in the OmniEmbedder state dict
PART_PREFIXES: dict[str, str] = {
    "language_model": "backbone.language_model.",
    "vision_encoder": "backbone.visual.",
    "audio_encoder": "audio_encoder.",
    "projector": "projector.",
}
# convenient groups usable wherever a list of parts is configured
PART_GROUPS: dict[str, tuple[str, ...]] = {
    "backbone": ("language_model", "vision_encoder"),
    "audio": ("audio_encoder", "projector"),
    "all": tuple(PART_PREFIXES),
}

SUPPORTED_BACKBONES = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")
SUPPORTED_AUDIO = ("qwen3_omni_moe_audio_encoder", "whisper")


def expand_parts(parts: list[str] | tuple[str, ...] | str) -> list[str]:
    """Expand part names and groups (``backbone``, ``audio``, ``all``) into part names, in a stable order."""
    if isinstance(parts, str):
        parts = [parts]
    out: list[str] = []
    for p in parts:
        if p in PART_GROUPS:
            names = PART_GROUPS[p]
        elif p in PART_PREFIXES:
            names = (p,)
        else:
            known = sorted([*PART_PREFIXES, *PART_GROUPS])
            raise ValueError(f"unknown model part {p!r}; known parts and groups: {', '.join(known)}")
        out += [n for n in names if n not in out]
    return out


@dataclass
class AudioFeatureConfig:
    """Log-mel front end of the audio encoder (Whisper-style feature extractor)."""

    sampling_rate: int = 16000
    num_mel_bins: int = 128
    hop_length: int = 160
    n_fft: int = 400
    max_seconds: float = 30.0


@dataclass
class OmniConfig:
    backbone_type: str = "qwen3_vl"
    backbone: dict[str, Any] = field(default_factory=dict)  # the transformers config of the backbone
    audio_type: str = "qwen3_omni_moe_audio_encoder"
    audio_encoder: dict[str, Any] = field(default_factory=dict)  # the transformers config of the audio encoder
    audio_features: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    audio_pool_stride: int = 1  # average-pool audio encoder outputs by this factor (Whisper: 4 is sensible)
    projector_hidden: int = 0  # 0: hidden size of the backbone
    pooling: str = "last"  # "last" (last non-padding token) or "mean"
    normalize: bool = True
    audio_token_ids: dict[str, int] = field(default_factory=dict)
    base_vocab_size: int = 0  # rows of the input embedding present before the audio tokens were added
    query_template: str = "<|im_start|>{instruction}\n{content}<|im_end|><|endoftext|>"
    candidate_template: str = "<|im_start|>{content}<|im_end|><|endoftext|>"
    prompt_format: str = "template"  # "template" (the two above) or "chat" (the backbone's chat template): prompts.py
    default_instruction: str = "Represent the user's input."  # chat format: the system turn of candidates
    video_fps: float = 2.0
    parts: dict[str, str] = field(default_factory=lambda: dict(PART_PREFIXES))
    format: str = FORMAT
    history: list[dict[str, Any]] = field(default_factory=list)  # provenance: init, training phases, fusion

    def __post_init__(self) -> None:
        if isinstance(self.audio_features, dict):
            self.audio_features = AudioFeatureConfig(**self.audio_features)
        if self.backbone_type not in SUPPORTED_BACKBONES:
            raise ValueError(f"backbone_type {self.backbone_type!r} is not supported; use one of {SUPPORTED_BACKBONES}")
        if self.audio_type not in SUPPORTED_AUDIO:
            raise ValueError(f"audio_type {self.audio_type!r} is not supported; use one of {SUPPORTED_AUDIO}")
        if self.prompt_format not in ("template", "chat"):
            raise ValueError(f"prompt_format must be 'template' or 'chat', got {self.prompt_format!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "OmniConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not an omni-lightning model directory. Create one with "
                "`omni-lightning init-model --preset tiny --out DIR` or assemble one from local checkpoints with "
                "`omni-lightning init-model --backbone VLM_DIR --audio-encoder AUDIO_DIR --out DIR`."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT!r})")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------- transformers' form
MODEL_TYPE = "omni_embedder"
HF_CONFIG_NAME = "config.json"


class OmniEmbedderConfig(PretrainedConfig):
    """The omni config (``omni``: the dict of :class:`OmniConfig`) as a transformers config."""

    model_type = MODEL_TYPE

    def __init__(self, omni: dict[str, Any] | None = None, **kwargs) -> None:
        self.omni = dict(omni or {})
        text = (self.omni.get("backbone") or {}).get("text_config") or {}
        if "hidden_size" in text:
            kwargs.setdefault("hidden_size", int(text["hidden_size"]))
        super().__init__(**kwargs)

    @classmethod
    def from_omni(cls, config: OmniConfig) -> "OmniEmbedderConfig":
        return cls(omni=config.to_dict(), architectures=["OmniEmbedderModel"])


def write_hf_config(directory: str | Path, config: OmniConfig) -> None:
    """``config.json`` (model type ``omni_embedder``) beside ``omni_config.json``."""
    OmniEmbedderConfig.from_omni(config).to_json_file(str(Path(directory) / HF_CONFIG_NAME))
