"""Create model directories: the embedded tiny preset, or an assembly of local real checkpoints.

``omni-lightning init-model --preset tiny --out DIR`` builds the same transformers classes as the real model
(Qwen3-VL backbone, Qwen3-Omni audio tower) with a tiny config, weights drawn from a fixed seed and a byte-level
BPE tokenizer trained locally with ``tokenizers``. Nothing is downloaded.

``omni-lightning init-model --backbone VLM_DIR --audio-encoder AUDIO_DIR --out DIR`` assembles a real one:
the backbone (Qwen3-VL, Qwen2-VL or Qwen2.5-VL) and its processor from a local directory, the audio encoder
from a local Qwen3-Omni checkpoint (its ``thinker.audio_tower`` tensors), a stand-alone Qwen3-Omni audio
encoder, or a Whisper checkpoint (its encoder), and a freshly initialised projector.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_lightning.model.audio import build_audio_encoder
from omni_lightning.model.config import AUDIO_TOKENS, AudioFeatureConfig, OmniConfig
from omni_lightning.model.omni import (
    OmniEmbedder,
    audio_token_ids,
    check_local_dir,
    weight_files,
)

VISION_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The tiny preset: every size in one place (CPU-friendly, ~1 M parameters).
TINY = {
    "vocab_size": 768,
    "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
    "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                   deepstack_visual_indexes=[1]),
    "audio": dict(num_mel_bins=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64,
                  output_dim=64, downsample_hidden_size=16, max_source_positions=200, n_window=50,
                  n_window_infer=100),
    "audio_features": dict(sampling_rate=16000, num_mel_bins=32, hop_length=160, n_fft=400, max_seconds=2.0),
    "projector_hidden": 128,
    "image_pixels": (16 * 16, 64 * 64),  # min / max pixels per image (32x32 digits, 32x64 pages)
}
# A larger preset of the same shape (~30 M parameters): for benchmarks where compute, not per-call
# overhead, should dominate, and for GPU smoke runs.
SMALL = {
    **TINY,
    "text": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, max_position_embeddings=1024),
    "vision": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                   deepstack_visual_indexes=[1, 3]),
    "audio": dict(num_mel_bins=32, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, d_model=256,
                  output_dim=512, downsample_hidden_size=64, max_source_positions=200, n_window=50,
                  n_window_infer=100),
    "projector_hidden": 512,
}
PRESETS = {"tiny": TINY, "small": SMALL}


def train_tiny_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus`` with the Qwen vision special tokens. Every digit is its own
    token, as in the Qwen tokenizers: a number is composed from its digits instead of being one opaque token
    (with one token per two-digit number, the tiny document specialist reached about 0.1 R@1 where split digits
    gave about 0.6 in a stage-0 experiment)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(VISION_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(VISION_SPECIAL_TOKENS[1:]),
    )


def add_audio_tokens(tokenizer, backbone: nn.Module, seed: int = 0) -> dict[str, int]:
    """Add the audio special tokens; grow the input embedding if needed (new rows = mean row + small noise)."""
    missing = [t for t in AUDIO_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = audio_token_ids(tokenizer)
    emb = backbone.get_input_embeddings()
    need = max(ids.values()) + 1
    if need > emb.num_embeddings:
        old = emb.weight.data
        g = torch.Generator().manual_seed(seed)
        extra = old.mean(0, keepdim=True) + old.std() * 0.02 * torch.randn(need - old.shape[0], old.shape[1], generator=g).to(old.dtype)
        new = nn.Embedding(need, old.shape[1], dtype=old.dtype)
        new.weight.data = torch.cat([old, extra], 0)
        backbone.set_input_embeddings(new)
        backbone.config.text_config.vocab_size = need
    return ids


def build_preset(preset: str, seed: int, corpus: list[str]) -> tuple[OmniEmbedder, Any]:
    """An embedded preset (``tiny`` or ``small``) whose tokenizer is trained on ``corpus`` (the strings it must
    read; :func:`omni_lightning.demo.demo_vocabulary` for the demo world): returns (model, backbone processor)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLModel,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if not corpus:
        raise ValueError("an embedded preset needs the vocabulary (strings) its tokenizer is trained on")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; embedded presets: {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    corpus = corpus + [f"<{i / 10:.1f} seconds>" for i in range(100)]
    tokenizer = train_tiny_tokenizer(corpus, sizes["vocab_size"])
    v = sizes["vision"]
    lo, hi = sizes["image_pixels"]
    image_processor = Qwen2VLImageProcessor(
        patch_size=v["patch_size"], merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
        size={"shortest_edge": lo, "longest_edge": hi},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=v["patch_size"], merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
        size={"shortest_edge": lo, "longest_edge": hi * 8}, do_sample_frames=False, cap_pixels_per_frame=True,
    )
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    t = sizes["text"]
    head_dim = t["head_dim"]
    section = [head_dim // 4, head_dim // 8, head_dim // 8]  # M-RoPE split of head_dim/2 (t, h, w)
    bconfig = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": section, "mrope_interleaved": True}, **t),
        vision_config=dict(out_hidden_size=t["hidden_size"], **v),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    backbone = Qwen3VLModel(bconfig)
    base_vocab = backbone.get_input_embeddings().num_embeddings
    ids = add_audio_tokens(tokenizer, backbone, seed)
    config = OmniConfig(
        backbone_type="qwen3_vl",
        backbone=backbone.config.to_dict(),
        audio_type="qwen3_omni_moe_audio_encoder",
        audio_encoder=dict(sizes["audio"]),
        audio_features=AudioFeatureConfig(**sizes["audio_features"]),
        projector_hidden=sizes["projector_hidden"],
        audio_token_ids=ids,
        base_vocab_size=base_vocab,
        history=[{"step": "init-model", "preset": preset, "seed": seed}],
    )
    torch.manual_seed(seed + 1)
    model = OmniEmbedder(config, backbone=backbone)
    _variance_preserving_init(model.audio_encoder)
    return model, processor


def _variance_preserving_init(encoder: nn.Module) -> None:
    """Re-draw the random audio tower's conv front end and linear layers with fan-in scaling.

    transformers initialises them with std 0.02, which shrinks the mel features ~10^4-fold through the three
    strided convs; the sinusoidal position embedding (norm ~sqrt(d_model)) then swamps them and every clip
    encodes alike. A pretrained tower (what the tiny one stands in for) passes its input through; so does
    one whose layers preserve the activation scale."""
    for m in encoder.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if isinstance(m, nn.Conv2d) else "linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_model(
    out: str | Path,
    preset: str | None = "tiny",
    backbone: str | None = None,
    audio_encoder: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str | None = None,
    vocabulary: list[str] | None = None,
    prompt_format: str | None = None,
) -> Path:
    """Write a model directory: an embedded ``preset`` with a tokenizer trained on ``vocabulary``, or an assembly of
    ``backbone`` + ``audio_encoder`` local directories."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if backbone or audio_encoder:
        if not (backbone and audio_encoder):
            raise ValueError("assembling a real model needs both --backbone and --audio-encoder (local directories)")
        model, processor = assemble(backbone, audio_encoder, seed=seed, dtype=dtype, prompt_format=prompt_format)
    else:
        model, processor = build_preset(preset or "tiny", seed, list(vocabulary or []))
    model.save_pretrained(out, processor=processor)
    return out


# ---------------------------------------------------------------------------------------------- real models
def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a transformers checkpoint directory")
    return json.loads(path.read_text())


def _load_prefixed(directory: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first prefix that matches anything, with the prefix stripped (reads only those)."""
    from safetensors import safe_open

    files = weight_files(directory)
    for prefix in prefixes:
        state = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        state[k[len(prefix):]] = f.get_tensor(k)
        if state:
            return state
    raise ValueError(f"{directory}: no tensors under any of the prefixes {prefixes}")


def load_audio_encoder(directory: str | Path) -> tuple[str, dict, nn.Module, AudioFeatureConfig]:
    """(audio_type, encoder config dict, encoder with weights, feature config) from a local checkpoint."""
    directory = check_local_dir(directory, "audio encoder directory")
    raw = _read_config(directory)
    kind = raw.get("model_type")
    if kind == "qwen3_omni_moe":
        cfg = raw.get("thinker_config", {}).get("audio_config")
        if cfg is None:
            raise ValueError(f"{directory}/config.json: a qwen3_omni_moe config without thinker_config.audio_config")
        audio_type, prefixes = "qwen3_omni_moe_audio_encoder", ("thinker.audio_tower.",)
    elif kind == "qwen3_omni_moe_audio_encoder":
        cfg, audio_type, prefixes = raw, kind, ("audio_tower.", "")
    elif kind == "whisper":
        cfg, audio_type, prefixes = raw, "whisper", ("model.encoder.", "encoder.")
    else:
        raise ValueError(
            f"{directory}: unsupported audio checkpoint model_type {kind!r}; use a Qwen3-Omni checkpoint "
            "(qwen3_omni_moe), a Qwen3-Omni audio encoder, or a Whisper checkpoint"
        )
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "architectures", "model_type")}
    probe = OmniConfig(audio_type=audio_type, audio_encoder=cfg)
    encoder = build_audio_encoder(probe)
    state = _load_prefixed(directory, prefixes)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [m for m in missing if "positional_embedding" not in m and "embed_positions" not in m]
    if missing or unexpected:
        raise ValueError(f"{directory}: audio encoder weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fe_path = directory / "preprocessor_config.json"
    fe = json.loads(fe_path.read_text()) if fe_path.is_file() else {}
    n_mels = int(cfg.get("num_mel_bins", fe.get("feature_size", 128)))
    features = AudioFeatureConfig(
        sampling_rate=int(fe.get("sampling_rate", 16000)),
        num_mel_bins=n_mels,
        hop_length=int(fe.get("hop_length", 160)),
        n_fft=int(fe.get("n_fft", 400)),
        max_seconds=float(fe.get("chunk_length", 30)),
    )
    return audio_type, cfg, encoder, features


def assemble(backbone_dir: str | Path, audio_dir: str | Path, seed: int = 0, dtype: str | None = None,
             prompt_format: str | None = None):
    """Backbone + processor from ``backbone_dir``, encoder from ``audio_dir``, a new projector. ``prompt_format``
    (:mod:`omni_lightning.model.prompts`): default ``chat`` when the checkpoint ships a chat template, else
    ``template``."""
    from omni_lightning.model.prompts import chat_template_of

    from transformers import AutoModel, AutoProcessor

    backbone_dir = check_local_dir(backbone_dir, "backbone directory")
    raw = _read_config(backbone_dir)
    kind = raw.get("model_type")
    if kind not in ("qwen3_vl", "qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"{backbone_dir}: unsupported backbone model_type {kind!r}; use Qwen3-VL, Qwen2-VL or Qwen2.5-VL")
    torch_dtype = getattr(torch, dtype) if dtype else None
    backbone = AutoModel.from_pretrained(
        str(backbone_dir), local_files_only=True, trust_remote_code=False, dtype=torch_dtype
    )
    processor = AutoProcessor.from_pretrained(str(backbone_dir), local_files_only=True, trust_remote_code=False)
    base_vocab = backbone.get_input_embeddings().num_embeddings
    ids = add_audio_tokens(processor.tokenizer, backbone, seed)
    audio_type, audio_cfg, encoder, features = load_audio_encoder(audio_dir)
    config = OmniConfig(
        backbone_type=kind,
        backbone=backbone.config.to_dict(),
        audio_type=audio_type,
        audio_encoder=audio_cfg,
        audio_features=features,
        audio_pool_stride=4 if audio_type == "whisper" else 1,
        prompt_format=prompt_format or ("chat" if chat_template_of(processor) else "template"),
        audio_token_ids=ids,
        base_vocab_size=base_vocab,
        history=[{"step": "init-model", "backbone": str(backbone_dir), "audio_encoder": str(audio_dir), "seed": seed,
                  "audio_features": asdict(features)}],
    )
    torch.manual_seed(seed)
    model = OmniEmbedder(config, backbone=backbone, audio_encoder=encoder)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model, processor
