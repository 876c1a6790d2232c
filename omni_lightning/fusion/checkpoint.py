"""Reading the inputs: safetensors headers, model directories (``Checkpoint``), and the streaming reader."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omni_lightning.fusion.config import STRUCTURAL_KEYS, FusionError
from omni_lightning.model.config import CONFIG_NAME, OmniConfig
from omni_lightning.model.omni import (
    WEIGHTS_INDEX_NAME,
    check_local_dir,
    weight_files,
)

# matrices whose row count may grow when a specialist adds tokens
EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|lm_head|embed_out)\.weight$")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h|layer)\.(\d+)\.")

# safetensors dtype -> (torch dtype, bytes per element, family)
DTYPES: dict[str, tuple[torch.dtype, int, str]] = {
    "F64": (torch.float64, 8, "float"),
    "F32": (torch.float32, 4, "float"),
    "F16": (torch.float16, 2, "float"),
    "BF16": (torch.bfloat16, 2, "float"),
    "F8_E4M3": (torch.float8_e4m3fn, 1, "float"),
    "F8_E5M2": (torch.float8_e5m2, 1, "float"),
    "I64": (torch.int64, 8, "int"),
    "I32": (torch.int32, 4, "int"),
    "I16": (torch.int16, 2, "int"),
    "I8": (torch.int8, 1, "int"),
    "U8": (torch.uint8, 1, "int"),
    "U16": (torch.uint16, 2, "int"),
    "U32": (torch.uint32, 4, "int"),
    "U64": (torch.uint64, 8, "int"),
    "BOOL": (torch.bool, 1, "bool"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def family(self) -> str:
        return DTYPES[self.dtype][2]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header: (header dict, byte offset of the data). Clear errors for anything else."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        # a zip (torch.save) or a raw pickle (0x80, protocol 2-5); a safetensors header whose length byte is 0x80
        # is told apart by the '{' that opens its JSON right after the 8-byte length
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):
            raise FusionError(f"{path} is a pickle / torch.save archive, not safetensors; pickle weights are refused "
                              "(convert them to safetensors first)")
        if len(head) < 8:
            raise FusionError(f"{path} is not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if n == 0 or n > 100_000_000 or 8 + n > size:
            raise FusionError(f"{path} is not a safetensors file (bad header length {n})")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FusionError(f"{path} is not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise FusionError(f"{path} is not a safetensors file (header is not a mapping)")
    data_start = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, e) = entry["dtype"], tuple(int(x) for x in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise FusionError(f"{path}: tensor {name}: malformed header entry {entry!r}") from err
        if dtype not in DTYPES:
            raise FusionError(f"{path}: tensor {name} has dtype {dtype}, which fusion does not handle")
        if any(x < 0 for x in shape) or e - s != math.prod(shape) * DTYPES[dtype][1] or s < 0 or data_start + e > size:
            raise FusionError(f"{path}: tensor {name}: data offsets {[s, e]} do not match shape {list(shape)} "
                              f"{dtype} within a file of {size} bytes (truncated or corrupt file)")
    return header, data_start


class Checkpoint:
    """A model directory's tensors (from the headers only), its omni config and/or HF config."""

    def __init__(self, path: str | Path, role: str) -> None:
        self.role = role
        self.path = check_local_dir(path, f"{role} directory")
        try:
            self.files = weight_files(self.path)
        except ValueError as e:  # pickle weights
            raise FusionError(str(e)) from e
        self.tensors: dict[str, TensorInfo] = {}
        index_map: dict[str, str] | None = None
        index = self.path / WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                index_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FusionError(f"{index} is not a valid safetensors index: {e}") from e
        for file in self.files:
            header, start = read_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise FusionError(f"{self.path}: tensor {name} is stored twice ({self.tensors[name].file.name} "
                                      f"and {file.name})")
                s, e = entry["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, entry["dtype"], tuple(entry["shape"]), start + s, e - s)
        if index_map is not None:
            for name, fname in index_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise FusionError(f"{index} maps tensor {name} to {fname}, but that shard does not hold it")
        self.omni: dict[str, Any] | None = None
        cfg_path = self.path / CONFIG_NAME
        if cfg_path.is_file():
            OmniConfig.load(self.path)  # validates
            self.omni = json.loads(cfg_path.read_text())
        hf = self.path / "config.json"
        self.hf_config: dict[str, Any] | None = None
        if hf.is_file():
            try:
                self.hf_config = json.loads(hf.read_text())
            except json.JSONDecodeError as e:
                raise FusionError(f"{hf} is not valid JSON: {e}") from e

    @property
    def config_file(self) -> Path:
        return self.path / (CONFIG_NAME if self.omni is not None else "config.json")

    def where(self, name: str) -> str:
        info = self.tensors.get(name)
        return str(info.file) if info else str(self.path)


def _structural(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(_structural(v, key + "."))
            elif k in STRUCTURAL_KEYS:
                out[key] = v
    return out


def architecture(ckpt: Checkpoint) -> dict[str, Any]:
    if ckpt.omni is not None:
        sig = {"backbone_type": ckpt.omni.get("backbone_type"), "audio_type": ckpt.omni.get("audio_type"),
               "parts": json.dumps(ckpt.omni.get("parts"), sort_keys=True)}
        sig.update(_structural(ckpt.omni.get("backbone", {}), "backbone."))
        sig.update(_structural(ckpt.omni.get("audio_encoder", {}), "audio_encoder."))
        return sig
    return _structural(ckpt.hf_config or {})
