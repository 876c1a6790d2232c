"""Audio: log-mel front end, the external audio encoder, and the 2-layer MLP projector.

The encoder is loaded through transformers: Qwen3-Omni's audio tower (``Qwen3OmniMoeAudioEncoder``, the
paper's choice, which takes packed variable-length features) or Whisper's encoder (fixed-length input,
padded here; its outputs can be average-pooled by ``audio_pool_stride``). Both are wrapped by
:class:`AudioTower` so the rest of the model sees one interface: features ``[B, mels, T]`` and their lengths
in, one packed ``[sum(n_i), D]`` tensor of audio tokens out, with ``n_i = audio_token_count(config, len_i)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_lightning.model.config import AudioFeatureConfig, OmniConfig


def audio_token_count(config: OmniConfig, feature_len: int) -> int:
    """Number of audio tokens the tower produces for ``feature_len`` mel frames (a pure function of the config)."""
    if config.audio_type == "qwen3_omni_moe_audio_encoder":
        n_window = int(config.audio_encoder.get("n_window", 50))
        chunk = n_window * 2
        leave = feature_len % chunk
        feat = (leave - 1) // 2 + 1
        n = ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (feature_len // chunk) * 13
    else:  # whisper: one conv with stride 2
        n = (feature_len - 1) // 2 + 1
    return math.ceil(n / config.audio_pool_stride)


class LogMel:
    """Resample to the encoder's rate and compute Whisper-style log-mel features (the encoder's own extractor)."""

    def __init__(self, cfg: AudioFeatureConfig, pad_to_max: bool = False) -> None:
        from transformers import WhisperFeatureExtractor

        self.cfg = cfg
        # Whisper's encoder has no attention mask: it must see every clip padded to its full window exactly
        # as in its training (zero waveform), whatever else is in the batch.
        self.pad_to_max = pad_to_max
        self.extractor = WhisperFeatureExtractor(
            feature_size=cfg.num_mel_bins,
            sampling_rate=cfg.sampling_rate,
            hop_length=cfg.hop_length,
            n_fft=cfg.n_fft,
            chunk_length=max(1, math.ceil(cfg.max_seconds)),
        )

    def __call__(self, waveforms: list[np.ndarray], sample_rates: list[int]) -> tuple[Tensor, Tensor]:
        """Returns features ``[B, mels, T_max]`` (float32) and valid frame counts ``[B]``."""
        import torchaudio.functional as AF

        max_samples = int(self.cfg.max_seconds * self.cfg.sampling_rate)
        clips = []
        for wav, sr in zip(waveforms, sample_rates):
            x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
            if x.dim() != 1:
                raise ValueError(f"audio waveform must be mono [n], got shape {tuple(x.shape)}")
            if sr != self.cfg.sampling_rate:
                x = AF.resample(x, sr, self.cfg.sampling_rate)
            clips.append(x[:max_samples].numpy())
        # one clip at a time: batching clips in the extractor zero-pads the shorter ones, which changes the
        # STFT frames at their ends (center padding) and so makes a clip's features depend on its batch
        feats_list, lens_list = [], []
        for clip in clips:
            out = self.extractor(
                [clip],
                sampling_rate=self.cfg.sampling_rate,
                padding="max_length" if self.pad_to_max else "longest",
                max_length=max_samples if self.pad_to_max else None,
                return_attention_mask=True,
                return_tensors="pt",
            )
            feats_list.append(out["input_features"][0])
            lens_list.append(int(out["attention_mask"][0].sum()))
        width = max(f.shape[-1] for f in feats_list)
        feats = torch.stack([F.pad(f, (0, width - f.shape[-1])) for f in feats_list])
        lens = torch.tensor(lens_list)
        return feats.float(), lens.long()


class AudioProjector(nn.Module):
    """The paper's 2-layer MLP: encoder width → hidden → backbone hidden size."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_audio_encoder(config: OmniConfig) -> nn.Module:
    """Instantiate the audio encoder from the config dict stored in the omni config (random weights)."""
    if config.audio_type == "qwen3_omni_moe_audio_encoder":
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
            Qwen3OmniMoeAudioEncoderConfig,
        )
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeAudioEncoder,
        )

        return Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig.from_dict(_strip(config.audio_encoder)))
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(WhisperConfig.from_dict(_strip(config.audio_encoder)))


def audio_output_dim(config: OmniConfig) -> int:
    if config.audio_type == "qwen3_omni_moe_audio_encoder":
        return int(config.audio_encoder["output_dim"])
    return int(config.audio_encoder["d_model"])


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "model_type")}


def encode_audio(encoder: nn.Module, config: OmniConfig, features: Tensor, lens: Tensor) -> Tensor:
    """Run the encoder on ``features [B, mels, T]`` with frame counts ``lens``; packed tokens ``[sum n_i, D]``."""
    counts = [audio_token_count(config, int(n)) for n in lens.tolist()]
    dtype = next(encoder.parameters()).dtype
    if config.audio_type == "qwen3_omni_moe_audio_encoder":
        # one clip per call: packed multi-clip calls let windows of one clip attend across into the next
        # under some attention backends, which makes a clip's encoding depend on its batch
        pieces = [
            encoder(input_features=features[i, :, : int(n)].to(dtype), feature_lens=lens[i : i + 1]).last_hidden_state
            for i, n in enumerate(lens.tolist())
        ]
    else:
        expected = 2 * int(config.audio_encoder.get("max_source_positions", 1500))
        if features.shape[-1] > expected:
            raise ValueError(f"audio features have {features.shape[-1]} frames; this Whisper encoder takes {expected}")
        padded = F.pad(features, (0, expected - features.shape[-1])).to(dtype)
        hidden = encoder(padded).last_hidden_state  # [B, expected // 2, D]
        pieces = [hidden[i, : (int(n) - 1) // 2 + 1] for i, n in enumerate(lens.tolist())]
    s = config.audio_pool_stride
    pooled = [F.avg_pool1d(p.T.unsqueeze(0), s, s, ceil_mode=True).squeeze(0).T if s > 1 else p for p in pieces]
    out = torch.cat(pooled, 0)
    assert out.shape[0] == sum(counts), (out.shape, counts)
    return out

