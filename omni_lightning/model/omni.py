"""OmniEmbedder: a vision-language backbone + an external audio encoder + a 2-layer MLP projector.

Plain PyTorch (no Lightning). ``forward(batch)`` takes what :class:`OmniProcessor` returns and gives one
L2-normalised embedding per sequence (last-token hidden state by default, mean pooling as an option).

Audio is spliced in the way the Qwen-Omni family does it: the audio encoder's outputs are projected to the
backbone's hidden size and written over the embeddings of the ``<|audio_pad|>`` placeholders; images and
videos go through the backbone's own vision path. Position ids are computed explicitly (M-RoPE via the
backbone's ``get_rope_index`` when vision inputs are present), so no stale ``rope_deltas`` cached by a
previous call can leak into a text or audio forward.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from omni_lightning.modalities import VISUAL
from omni_lightning.model.audio import (
    AudioProjector,
    audio_output_dim,
    build_audio_encoder,
    encode_audio,
)
from omni_lightning.model.config import (
    AUDIO_TOKENS,
    CONFIG_NAME,
    PART_PREFIXES,
    OmniConfig,
    expand_parts,
    write_hf_config,
)
from omni_lightning.model.processor import OmniProcessor
from omni_lightning.utils import dir_mode, lock_output, remove_leftovers, unlock_output

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_BACKBONE_CLASSES = {
    "qwen3_vl": ("transformers", "Qwen3VLModel", "Qwen3VLConfig"),
    "qwen2_vl": ("transformers", "Qwen2VLModel", "Qwen2VLConfig"),
    "qwen2_5_vl": ("transformers", "Qwen2_5_VLModel", "Qwen2_5_VLConfig"),
}


def _backbone_classes(kind: str):
    import transformers

    _, model_name, config_name = _BACKBONE_CLASSES[kind]
    return getattr(transformers, model_name), getattr(transformers, config_name)


def build_backbone(config: OmniConfig) -> nn.Module:
    model_cls, config_cls = _backbone_classes(config.backbone_type)
    return model_cls(config_cls.from_dict(dict(config.backbone)))


def pool(hidden: Tensor, attention_mask: Tensor, mode: str = "last") -> Tensor:
    """Pool ``hidden [B, L, D]`` over valid positions: the last non-padding token, or the mean."""
    mask = attention_mask.bool()
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    # last valid position per row, whichever side the padding is on
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class OmniEmbedder(nn.Module):
    """Backbone (``self.backbone``), audio encoder (``self.audio_encoder``), projector (``self.projector``)."""

    def __init__(self, config: OmniConfig, backbone: nn.Module | None = None, audio_encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config)
        self.audio_encoder = audio_encoder if audio_encoder is not None else build_audio_encoder(config)
        hidden = self.hidden_size
        self.projector = AudioProjector(audio_output_dim(config), config.projector_hidden or hidden, hidden)

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.text_config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        return self.hidden_size

    def part(self, name: str) -> nn.Module:
        """The module that owns a part's tensors (``language_model``, ``vision_encoder``, ``audio_encoder``, ``projector``)."""
        return self.get_submodule(PART_PREFIXES[name].rstrip("."))

    def parts(self, names: list[str] | str) -> list[nn.Module]:
        return [self.part(n) for n in expand_parts(names)]

    # ------------------------------------------------------------------ forward
    def embed_audio(self, features: Tensor, lens: Tensor) -> Tensor:
        """Packed projected audio tokens ``[sum n_i, hidden]`` for features ``[B, mels, T]``.

        A frozen audio encoder runs without autograd (its activations are not kept)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trainable(self.audio_encoder)):
            feats = encode_audio(self.audio_encoder, self.config, features, lens)
        return self.projector(feats)

    def _reaches_trainable(self, batch: dict[str, Tensor]) -> bool:
        """Whether a forward of ``batch`` touches any parameter that requires grad."""
        if _trainable(self.backbone.language_model) or _trainable(self.backbone.get_input_embeddings()):
            return True
        present = {m for key, m in _INPUT_MODALITY.items() if key in batch}
        return any(ms & present and _trainable(self.part(p)) for p, ms in _PART_MODALITIES.items())

    def idle_parts(self, modalities: set[str] | frozenset[str]) -> list[str]:
        """Trainable parts that a step holding only these modalities leaves without a gradient (the language model
        is always reached: queries are text)."""
        return [p for p, ms in _PART_MODALITIES.items() if not ms & set(modalities) and _trainable(self.part(p))]

    def _position_ids(self, batch: dict[str, Tensor]) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "image_grid_thw" in batch or "video_grid_thw" in batch:
            kwargs = {}
            if "second_per_grid_ts" in batch:
                kwargs["second_per_grid_ts"] = batch["second_per_grid_ts"]
            pos, _ = self.backbone.get_rope_index(
                ids,
                mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch.get("image_grid_thw"),
                video_grid_thw=batch.get("video_grid_thw"),
                attention_mask=mask,
                **kwargs,
            )
            return pos
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions.view(1, 1, -1).expand(3, ids.shape[0], -1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if torch.is_grad_enabled() and not self._reaches_trainable(batch):
            # e.g. the text side while only the projector trains: no graph, no kept activations
            with torch.no_grad():
                return self._forward(batch)
        return self._forward(batch)

    def _forward(self, batch: dict[str, Tensor]) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = self.backbone.get_input_embeddings()(ids)
        pad_id = self.config.audio_token_ids["<|audio_pad|>"]
        audio_mask = ids == pad_id
        if "audio_features" in batch:
            audio = self.embed_audio(batch["audio_features"], batch["audio_feature_lens"])
            if audio.shape[0] != int(audio_mask.sum()):
                raise ValueError(
                    f"{int(audio_mask.sum())} <|audio_pad|> placeholders but {audio.shape[0]} audio tokens; "
                    "prepare inputs with OmniProcessor so the counts match"
                )
            embeds = embeds.masked_scatter(audio_mask.unsqueeze(-1), audio.to(embeds.dtype))
        elif bool(audio_mask.any()):
            raise ValueError("input has <|audio_pad|> placeholders but no audio_features")
        vision = {
            k: batch[k]
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
            if k in batch
        }
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=self._position_ids(batch),
            use_cache=False,
            **vision,
        )
        emb = pool(out.last_hidden_state, mask, self.config.pooling).float()
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    @torch.no_grad()
    def encode(self, processor, items: list[dict], instruction: str | list[str] | None = None,
               batch_size: int = 32) -> Tensor:
        """Embeddings of ``items`` in batches (eval mode is the caller's choice). ``instruction``: one for all
        items, one per item, or ``None`` for candidates."""
        device = next(self.parameters()).device
        outs = []
        for i in range(0, len(items), batch_size):
            instr = instruction[i : i + batch_size] if isinstance(instruction, list) else instruction
            batch = processor(items[i : i + batch_size], instr)
            outs.append(self({k: v.to(device) for k, v in batch.items()}).cpu())
        return torch.cat(outs, 0)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, processor=None, max_shard_size: str | int = "2GB") -> Path:
        """Write config, safetensors weights (sharded above ``max_shard_size``) and processor files atomically: into a
        temporary folder beside ``directory``, renamed into place at the end, under the output's lock (a concurrent
        save to the same folder is refused; what a killed save left beside it is removed first). The folder follows
        the user's umask."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_output(directory)
        try:
            remove_leftovers(directory)
            return self._save_into(directory, processor, max_shard_size)
        finally:
            unlock_output(lock)

    def _save_into(self, directory: Path, processor, max_shard_size: str | int) -> Path:
        from huggingface_hub import split_torch_state_dict_into_shards

        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        os.chmod(tmp, dir_mode())  # not mkdtemp's 0700: a model folder is for sharing
        try:
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            split = split_torch_state_dict_into_shards(
                state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
            )
            for filename, names in split.filename_to_tensors.items():
                save_file({n: state[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
            if split.is_sharded:
                index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
                (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
            self.config.save(tmp)
            write_hf_config(tmp, self.config)  # config.json: AutoModel.from_pretrained(directory) works
            if processor is not None:
                processor.save_pretrained(tmp)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> "OmniEmbedder":
        """Load a model directory written by :meth:`save_pretrained` (bit-exact). The parameters keep the dtype they
        are stored in (a bf16 directory loads as bf16, without a float32 detour) unless ``dtype`` is given."""
        directory = check_local_dir(directory, "model directory")
        config = OmniConfig.load(directory)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # pragma: no cover - older transformers
            no_init_weights = contextlib.nullcontext
        state = load_safetensors_dir(directory)
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        stored = max(set(floats), key=floats.count) if floats else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(stored)
        try:
            with no_init_weights():  # the storage stays untouched until the loaded tensors replace it
                model = cls(config)
        finally:
            torch.set_default_dtype(previous)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"{directory}: weights do not match the omni config: missing {sorted(missing)[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            )
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model


# The parts beyond the language model, and the modalities whose inputs reach them; the model-input key that
# carries each modality's media (document pages travel as images).
_PART_MODALITIES = {"vision_encoder": frozenset(VISUAL), "audio_encoder": frozenset({"audio"}), "projector": frozenset({"audio"})}
_INPUT_MODALITY = {"pixel_values": "image", "pixel_values_videos": "video", "audio_features": "audio"}


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def check_local_dir(path: str | Path, what: str) -> Path:
    """A local directory, or a clear error (hub ids are refused: nothing is ever downloaded)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    text = str(path)
    looks_like_hub = "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1
    hint = (
        f" {text!r} looks like a hub id; omni-lightning never downloads: download the checkpoint yourself and "
        "pass its local directory."
        if looks_like_hub
        else ""
    )
    raise FileNotFoundError(f"{what} {text!r} does not exist or is not a directory.{hint}")


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a directory (via the index when sharded). Pickle weights are refused."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [directory / f for f in files]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{index} lists shard {p.name}, which is missing")
        return paths
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise ValueError(f"{directory} holds pickle weights ({pickles[0]}); only safetensors are loaded")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")


def load_safetensors_dir(directory: str | Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def audio_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in AUDIO_TOKENS}
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in ids.items() if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"tokenizer lacks the audio tokens {missing}")
    return ids


def load_model_and_processor(directory: str | Path, dtype: torch.dtype | None = None):
    model = OmniEmbedder.from_pretrained(directory, dtype=dtype)
    return model, OmniProcessor.from_pretrained(directory, model.config)


__all__ = [
    "CONFIG_NAME",
    "OmniEmbedder",
    "audio_token_ids",
    "check_local_dir",
    "load_model_and_processor",
    "load_safetensors_dir",
    "pool",
    "weight_files",
]
