"""Decoupled Specialist Fusion: merge specialists' task vectors into one model, streaming safetensors.

``omni-lightning fuse --config configs/fuse.yaml`` (see that file for every option) or, from Python::

    from omni_lightning.fusion import FuseConfig, fuse
    fuse(FuseConfig(base="runs/demo/base", specialists=["runs/demo/specialists/image", ...],
                    alpha=[0.3, ...], out="runs/demo/fused"))

**Methods** (all arithmetic in float32 whatever the stored dtype; results written back in the base's dtype).
With task vectors Δ_m = θ_m − θ₀ and coefficients α_m:

* ``task_arithmetic``: θ₀ + Σ_m α_m Δ_m (the paper's choice);
* ``ties``: per tensor, each Δ_m is trimmed to its top-``density`` magnitudes (exactly k = ⌈density·n⌉
  entries, ties at the threshold broken by flat index, lowest first); the sign of each element is elected by
  Σ_m α_m Δ̂_m; the agreeing entries are averaged with weights α_m (Σ α_m Δ̂_m / Σ α_m over agreeing m);
  θ = θ₀ + ``scale`` · that mean;
* ``dare``: each delta element is dropped with probability p and the rest rescaled by 1/(1−p), then
  combined by ``task_arithmetic`` or ``ties`` (``dare.combine``); the random mask of an element depends only on
  (seed, specialist name, tensor name, element index), so neither the order of the specialists nor the
  chunking changes the result;
* ``linear``: (w₀ θ₀ + Σ_m α_m θ_m) / (w₀ + Σ_m α_m), a weighted average of the full weights.

**Ownership.** Tensors pair by name (else by the name without wrapper prefixes such as ``model.`` and
``language_model.``, which differ between hub files and transformers 5 modules; the output keeps θ₀'s names).
Every tensor of θ₀ is fused unless a part rule says otherwise. A tensor absent from θ₀ is
copied bit-exactly from the one specialist that has it (two specialists adding it is an error). Rows that a
specialist added to an embedding matrix (new tokens) are copied from it while the base rows are fused.
Model directories describe themselves: in an omni-lightning model directory (``omni_config.json``) the parts
``audio_encoder`` and ``projector`` are grafted modules (in the paper they do not exist in θ₀) and the
embedding rows from ``base_vocab_size`` on are the audio tokens, so they are copied from the specialist whose
history records training those parts (``parts: {projector: {owner: NAME}}`` names it explicitly). Plain
Hugging Face safetensors checkpoints have no such description: ownership comes from tensor presence alone.

**Streaming.** Input headers are parsed and validated first (nothing is written before every metadata check
passes). Tensors are then read in blocks of rows with ``pread`` into reused buffers (``io_threads`` read and
hash the next blocks of every input while the current one is merged, ``chunk_mb`` at a time so the work
buffers stay in the CPU cache) and written by a writer thread into pre-planned safetensors shards, so peak
memory is a few blocks, plus one float32 copy of the tensor being thresholded for TIES' k-th value selection
— not the model. NaN/inf in any input is found while streaming. The output is assembled in a temporary folder
beside the destination (its ranges flushed to disk as they are written) and renamed at the end.

**Diagnostics** (``diagnostics.json`` + ``diagnostics.png`` in the output folder, or ``--diagnose-only``):
per specialist the global L2 norm of its task vector (over the fused tensors), pairwise cosines, and norms
per part and per layer — the evidence the paper uses for Projector Drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from omni_lightning.model.config import CONFIG_NAME, PART_GROUPS, OmniConfig, expand_parts
from omni_lightning.model.omni import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, check_local_dir, weight_files

METHODS = ("task_arithmetic", "ties", "dare", "linear")
PART_MODES = ("fuse", "keep_base", "copy")
NEW_TOKENS = "new_tokens"  # pseudo-part: the embedding rows from base_vocab_size on (omni model dirs)
GRAFT_PARTS = PART_GROUPS["audio"]  # parts grafted onto the base VLM: copied from their owner by default
DIAGNOSTICS_JSON = "diagnostics.json"
DIAGNOSTICS_PNG = "diagnostics.png"
# matrices whose row count may grow when a specialist adds tokens
EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|lm_head|embed_out)\.weight$")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h|layer)\.(\d+)\.")
DARE_BLOCK = 1 << 20  # elements per independently seeded DARE random block
HASHES = ("crc32", "sha256", "none")
# config keys whose values in a model's config describe its architecture (vocab sizes may differ)
STRUCTURAL_KEYS = frozenset({
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "depth", "num_heads", "patch_size", "spatial_merge_size",
    "temporal_patch_size", "out_hidden_size", "d_model", "encoder_layers", "encoder_attention_heads",
    "encoder_ffn_dim", "num_mel_bins", "output_dim", "n_layer", "n_embd", "n_head", "num_layers", "n_inner",
    "num_experts", "moe_intermediate_size", "tie_word_embeddings",
})

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


class FusionError(ValueError):
    """A bad input or configuration, found before the destination is touched."""


# ============================================================================================ configuration
@dataclass
class TiesOptions:
    density: float = 0.2  # fraction of each task vector kept per tensor (TIES paper: top 20 %)
    scale: float = 1.0  # λ: θ = θ₀ + λ · (disjoint weighted mean)


@dataclass
class DareOptions:
    p: float = 0.1  # drop probability, in [0, 1)
    seed: int = 0
    combine: str = "task_arithmetic"  # task_arithmetic | ties


@dataclass
class LinearOptions:
    base_weight: float = 0.0  # w₀: weight of θ₀ in the average


@dataclass
class PartRule:
    mode: str | None = None  # fuse | keep_base | copy (None: the default for that part)
    owner: str | None = None  # copy: the specialist to copy from (None: from the model dirs' history)
    alpha: dict[str, float] = field(default_factory=dict)  # fuse: per-specialist coefficients for this part


@dataclass
class FuseConfig:
    base: str = ""
    specialists: list[str] = field(default_factory=list)
    alpha: list[float] | float = field(default_factory=list)
    names: list[str] | None = None
    out: str | None = None
    method: str = "task_arithmetic"
    ties: TiesOptions = field(default_factory=TiesOptions)
    dare: DareOptions = field(default_factory=DareOptions)
    linear: LinearOptions = field(default_factory=LinearOptions)
    parts: dict[str, PartRule] = field(default_factory=dict)
    overwrite: bool = False
    diagnose_only: bool = False
    diagnostics_dir: str | None = None  # --diagnose-only: also write diagnostics.json/.png here
    shard_size: str | int = "2GB"
    chunk_mb: float = 2.0  # float32 MB per work buffer: rows of one tensor merged at a time (cache-sized)
    threads: int = 1  # torch threads for the arithmetic (cache-sized chunks: more threads only add overhead)
    io_threads: int = 2  # threads reading and hashing the inputs of the next chunks, in parallel with the merge
    read_mb: float = 16.0  # MB read from each input at a time (then merged chunk_mb at a time)
    hash: str = "crc32"  # content hash of each input, recorded in the output's config: crc32 | sha256 | none
    fsync: bool = True  # flush output files to disk before the final rename
    progress: bool = True

    def __post_init__(self) -> None:
        for key, cls in (("ties", TiesOptions), ("dare", DareOptions), ("linear", LinearOptions)):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, _build(cls, value, key))
        self.parts = {
            k: (_build(PartRule, v or {}, f"parts.{k}") if not isinstance(v, PartRule) else v)
            for k, v in (self.parts or {}).items()
        }


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise FusionError(f"config key {where!r} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FusionError(f"unknown config key(s) {', '.join(f'{where}.{u}' for u in unknown)}; known: {sorted(known)}")
    return cls(**data)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FuseConfig:
    """A :class:`FuseConfig` from a YAML file (optional) with dotted-key ``overrides`` applied on top."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FusionError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise FusionError(f"{p}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        node = data
        *head, last = key.split(".")
        for h in head:
            if not isinstance(node.get(h), dict):
                node[h] = {}
            node = node[h]
        node[last] = value
    where = str(path) if path else "config"
    known = {f.name for f in dataclasses.fields(FuseConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FusionError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return FuseConfig(**data)


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not m:
        raise FusionError(f"shard_size {value!r} is not a size (e.g. 2GB, 500MB, 1000000)")
    unit = m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def validate_config(cfg: FuseConfig) -> None:
    """Parameter checks that need no file (run first, before any directory is opened)."""
    if not cfg.base:
        raise FusionError("no base model directory given (base / --base)")
    if not cfg.specialists:
        raise FusionError("no specialist directories given (specialists / --specialists)")
    n = len(cfg.specialists)
    if isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool):
        cfg.alpha = [float(cfg.alpha)] * n
    if not isinstance(cfg.alpha, list) or len(cfg.alpha) != n:
        got = len(cfg.alpha) if isinstance(cfg.alpha, list) else cfg.alpha
        raise FusionError(
            f"alpha has {got} coefficient(s) for {n} specialist(s) ({', '.join(map(str, cfg.specialists))}); "
            "give one coefficient per specialist, in the same order"
        )
    try:
        cfg.alpha = [float(a) for a in cfg.alpha]
    except (TypeError, ValueError) as e:
        raise FusionError(f"alpha must be numbers, got {cfg.alpha!r}") from e
    if not all(math.isfinite(a) for a in cfg.alpha):
        raise FusionError(f"alpha must be finite, got {cfg.alpha}")
    if cfg.names is not None:
        if len(cfg.names) != n:
            raise FusionError(f"names has {len(cfg.names)} entries for {n} specialists")
        names = [str(x) for x in cfg.names]
    else:
        names = [Path(s).name for s in cfg.specialists]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise FusionError(f"specialist names must be unique, {dup} repeats; set names: [...] (--names)")
    if "base" in names:
        raise FusionError("'base' is reserved; name the specialists otherwise (names / --names)")
    cfg.names = names
    if cfg.method not in METHODS:
        raise FusionError(f"method {cfg.method!r} is unknown; use one of {', '.join(METHODS)}")
    d = cfg.ties.density
    if not (isinstance(d, (int, float)) and 0 < d <= 1):
        raise FusionError(f"ties.density must be in (0, 1], got {d!r}")
    if not (isinstance(cfg.ties.scale, (int, float)) and math.isfinite(cfg.ties.scale)):
        raise FusionError(f"ties.scale must be a finite number, got {cfg.ties.scale!r}")
    p = cfg.dare.p
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise FusionError(f"dare.p must be in [0, 1), got {p!r}")
    if cfg.dare.combine not in ("task_arithmetic", "ties"):
        raise FusionError(f"dare.combine must be task_arithmetic or ties, got {cfg.dare.combine!r}")
    if not isinstance(cfg.dare.seed, int):
        raise FusionError(f"dare.seed must be an integer, got {cfg.dare.seed!r}")
    uses_ties = cfg.method == "ties" or (cfg.method == "dare" and cfg.dare.combine == "ties")
    if (uses_ties or cfg.method == "linear") and any(a < 0 for a in cfg.alpha):
        raise FusionError(f"{cfg.method} takes non-negative weights; alpha = {cfg.alpha}")
    if cfg.method == "linear":
        w0 = cfg.linear.base_weight
        if not (isinstance(w0, (int, float)) and math.isfinite(w0) and w0 >= 0):
            raise FusionError(f"linear.base_weight must be a finite number >= 0, got {w0!r}")
        if w0 + sum(cfg.alpha) <= 0:
            raise FusionError("linear: the weights (base_weight + alpha) sum to 0")
    for key, rule in cfg.parts.items():
        if rule.mode is not None and rule.mode not in PART_MODES:
            raise FusionError(f"parts.{key}.mode {rule.mode!r} is unknown; use one of {', '.join(PART_MODES)}")
        if rule.owner is not None and rule.owner not in names and rule.owner != "base":
            raise FusionError(f"parts.{key}.owner {rule.owner!r} is not a specialist name ({', '.join(names)}) or 'base'")
        for nm, a in (rule.alpha or {}).items():
            if nm not in names:
                raise FusionError(f"parts.{key}.alpha names {nm!r}, which is not a specialist ({', '.join(names)})")
            if not (isinstance(a, (int, float)) and math.isfinite(a)):
                raise FusionError(f"parts.{key}.alpha.{nm} must be a finite number, got {a!r}")
            if (uses_ties or cfg.method == "linear") and a < 0:
                raise FusionError(f"parts.{key}.alpha.{nm}: {cfg.method} takes non-negative weights")
    if cfg.hash not in HASHES:
        raise FusionError(f"hash must be one of {', '.join(HASHES)}, got {cfg.hash!r}")
    if parse_size(cfg.shard_size) <= 0:
        raise FusionError(f"shard_size must be positive, got {cfg.shard_size!r}")
    for key in ("chunk_mb", "read_mb"):
        v = getattr(cfg, key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise FusionError(f"{key} must be positive, got {v!r}")
    for key in ("threads", "io_threads"):
        v = getattr(cfg, key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise FusionError(f"{key} must be an integer >= 1, got {v!r}")
    if not cfg.diagnose_only and not cfg.out:
        raise FusionError("no output directory given (out / --out)")


# ============================================================================================ reading inputs
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
        head = f.read(8)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise FusionError(f"{path} is a pickle / torch.save archive, not safetensors; pickle weights are refused "
                              "(convert them to safetensors first)")
        if len(head) < 8:
            raise FusionError(f"{path} is not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > 100_000_000 or 8 + n > size:
            raise FusionError(f"{path} is not a safetensors file (bad header length {n})")
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


# ============================================================================================ the plan
@dataclass
class Segment:
    r0: int
    r1: int
    kind: str  # "fuse" | "copy"
    src: int = 0  # copy: input index (0 = base, m + 1 = specialist m)
    reads: tuple[int, ...] = ()  # inputs read for these rows (every input that has them)


@dataclass
class TensorPlan:
    name: str
    dtype: str  # output dtype (safetensors name)
    shape: tuple[int, ...]
    group: str  # part name (omni), or the name's prefix
    rule: str  # human-readable: fuse | keep_base | copy:NAME | new:NAME
    segments: list[Segment]
    alphas: tuple[float, ...]  # per specialist, for fuse segments
    inputs: dict[int, TensorInfo]
    unchanged: tuple[int, ...] = ()  # inputs expected to equal the base on copied rows (warn otherwise)

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]

    @property
    def fused_rows(self) -> int:
        return sum(s.r1 - s.r0 for s in self.segments if s.kind == "fuse")


@dataclass
class Plan:
    cfg: FuseConfig
    inputs: list[Checkpoint]  # 0 = base, then the specialists
    names: list[str]  # input names: "base", then the specialists'
    tensors: list[TensorPlan]
    owners: dict[str, str | None]
    file_owner: int
    warnings: list[str]
    omni: bool


# wrapper prefixes that differ between hub checkpoints and transformers 5 modules (``model.layers.*`` vs
# ``model.language_model.layers.*``, ``visual.*`` vs ``model.visual.*``): stripped to pair tensors by name
_WRAPPERS = ("model.", "language_model.", "text_model.")


def normalized_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


def pair_names(base: Checkpoint, spec: Checkpoint) -> dict[str, str]:
    """Base tensor name -> the specialist's name for it: the same name, else the one name that is equal after
    stripping wrapper prefixes (``normalized_name``); ambiguous normalized names are not paired."""
    pairs = {n: n for n in base.tensors if n in spec.tensors}
    rest_base = [n for n in base.tensors if n not in pairs]
    if not rest_base:
        return pairs
    taken = set(pairs.values())
    index: dict[str, list[str]] = {}
    for n in spec.tensors:
        if n not in taken:
            index.setdefault(normalized_name(n), []).append(n)
    base_norm: dict[str, int] = {}
    for n in rest_base:
        base_norm[normalized_name(n)] = base_norm.get(normalized_name(n), 0) + 1
    for n in rest_base:
        key = normalized_name(n)
        cands = index.get(key, [])
        if len(cands) == 1 and base_norm[key] == 1:
            pairs[n] = cands[0]
    return pairs


def _trained_parts(spec: Checkpoint, base: Checkpoint) -> set[str]:
    """Parts that a specialist's own history entries (those beyond the base's) record training."""
    base_hist = (base.omni or {}).get("history", [])
    out: set[str] = set()
    for h in (spec.omni or {}).get("history", []):
        if h in base_hist or not isinstance(h, dict):
            continue
        parts = list(h.get("train_parts") or [])
        lora = h.get("lora")
        if isinstance(lora, dict):
            parts += list(lora.get("parts") or [])
        for p in parts:
            try:
                out.update(expand_parts(p))
            except ValueError:
                pass
    return out


def build_plan(cfg: FuseConfig) -> Plan:
    """Open every input's headers and decide, per tensor, what the output holds. Reads no tensor data."""
    validate_config(cfg)
    base = Checkpoint(cfg.base, "base model")
    specs = [Checkpoint(p, f"specialist {n!r}") for p, n in zip(cfg.specialists, cfg.names)]
    inputs = [base, *specs]
    names = ["base", *cfg.names]
    M = len(specs)
    warnings: list[str] = []
    if cfg.out:
        out = Path(cfg.out).expanduser().resolve()
        for ck in inputs:
            if out == ck.path.resolve() or ck.path.resolve() in out.parents:
                raise FusionError(f"output {cfg.out} would overwrite or nest inside input {ck.path}")

    # the same kind of model directory, the same architecture
    for s, n in zip(specs, cfg.names):
        if (s.omni is None) != (base.omni is None):
            which = "has" if s.omni is not None else "lacks"
            raise FusionError(f"specialist {n!r} ({s.path}) {which} {CONFIG_NAME} but the base ({base.path}) "
                              "does not: they are not the same kind of model directory")
        a, b = architecture(base), architecture(s)
        diff = [k for k in a if k in b and a[k] != b[k]]
        if diff:
            k = diff[0]
            raise FusionError(f"specialist {n!r} ({s.config_file}) has a different architecture from the base "
                              f"({base.config_file}): {k} = {b[k]!r} vs {a[k]!r}")
    omni = base.omni is not None
    part_prefixes: dict[str, str] = dict(base.omni.get("parts", {})) if omni else {}
    base_vocab = int(base.omni.get("base_vocab_size", 0)) if omni else 0

    # part rules: defaults (omni grafts are copied from their owner), then the user's
    rules: dict[str, PartRule] = {}
    if omni:
        for p in GRAFT_PARTS:
            if p in part_prefixes:
                rules[p] = PartRule(mode="copy")
        rules[NEW_TOKENS] = PartRule(mode="copy")
    for key, r in cfg.parts.items():
        d = rules.get(key, PartRule())
        rules[key] = PartRule(mode=r.mode or d.mode or "fuse", owner=r.owner or d.owner, alpha=dict(r.alpha or {}))
        if key == NEW_TOKENS and not omni:
            warnings.append("parts.new_tokens applies only to omni-lightning model directories; ignored")
        if key not in part_prefixes and key != NEW_TOKENS and not any(k.startswith(key) for k in base.tensors):
            known = f"not a part of this model ({', '.join([*part_prefixes, NEW_TOKENS])})" if omni else \
                "this base has no omni_config.json, so keys are tensor-name prefixes"
            raise FusionError(f"parts.{key}: no tensor of the base ({base.path}) starts with {key!r}; {known}")
    prefix_rules = {(part_prefixes.get(k, k)): k for k in rules if k != NEW_TOKENS}

    # owners of copied parts: explicit, else the one specialist whose history records training the part
    trained = {n: _trained_parts(s, base) for s, n in zip(specs, cfg.names)}
    owners: dict[str, str | None] = {}
    for key, r in rules.items():
        if r.mode != "copy" or key == NEW_TOKENS:
            continue
        if r.owner:
            owners[key] = None if r.owner == "base" else r.owner
            continue
        who = sorted(n for n in cfg.names if key in trained[n])
        if len(who) > 1:
            raise FusionError(f"part {key} was trained by several specialists ({', '.join(who)}); it can be copied from "
                              f"one only: set parts.{key}.owner, or parts.{key}.mode: fuse")
        owners[key] = who[0] if who else None
        if not who and (omni and key not in GRAFT_PARTS or not omni):
            warnings.append(f"parts.{key}: mode copy but no specialist records training it; the base's copy is kept")
    if omni:
        r = rules[NEW_TOKENS]
        if r.mode == "copy":
            owners[NEW_TOKENS] = (None if r.owner == "base" else r.owner) if r.owner else owners.get("projector")
    idx = {n: i + 1 for i, n in enumerate(cfg.names)}

    def rule_for(name: str) -> tuple[str, PartRule | None]:
        best, key = "", None
        for pre, k in prefix_rules.items():
            if name.startswith(pre) and len(pre) > len(best):
                best, key = pre, k
        group = next((p for p, pre in sorted(part_prefixes.items(), key=lambda x: -len(x[1])) if name.startswith(pre)), None)
        if group is None:
            m = LAYER_RE.search(name)
            group = name[: m.start()] if m else name.rsplit(".", 2)[0] if name.count(".") >= 2 else name.split(".")[0]
        return group, (rules[key] if key is not None else None)

    plans: list[TensorPlan] = []
    growers: dict[str, int] = {}
    pairs = [pair_names(base, s) for s in specs]
    for m, pm in enumerate(pairs, 1):
        renamed = sorted((b_, s_) for b_, s_ in pm.items() if b_ != s_)
        if renamed:
            warnings.append(f"{names[m]}: {len(renamed)} tensors paired with the base by normalized name, e.g. "
                            f"{renamed[0][1]} -> {renamed[0][0]}; the output uses the base's names")
    for name in sorted(base.tensors):
        b = base.tensors[name]
        infos = {0: b}
        for m, s in enumerate(specs, 1):
            t = s.tensors.get(pairs[m - 1].get(name, "\0"))
            if t is None:
                raise FusionError(f"specialist {names[m]!r} lacks tensor {name} of the base ({b.file}); "
                                  f"its weights ({s.path}) must hold every base tensor")
            if t.family != b.family:
                raise FusionError(f"tensor {name}: {t.dtype} in {t.file} vs {b.dtype} in {b.file} (different dtype family)")
            if t.shape != b.shape:
                grows = (EMBEDDING_RE.search(name) and len(t.shape) == len(b.shape) >= 1
                         and t.shape[1:] == b.shape[1:] and t.shape[0] > b.shape[0])
                if not grows:
                    raise FusionError(f"tensor {name}: shape {list(t.shape)} in {t.file} vs {list(b.shape)} in {b.file}")
                if name in growers:
                    raise FusionError(f"tensor {name}: both {names[growers[name]]!r} and {names[m]!r} add rows "
                                      f"({specs[growers[name] - 1].where(name)}, {t.file}); new tokens can come from one "
                                      "specialist only")
                growers[name] = m
            infos[m] = t
        group, rule = rule_for(name)
        rows_out = max(i.rows for i in infos.values())
        base_rows = b.rows
        all_in = tuple(sorted(infos))
        segs: list[Segment] = []
        mode = rule.mode if rule is not None else "fuse"
        alphas = list(cfg.alpha)
        if rule is not None and rule.alpha:
            for nm, a in rule.alpha.items():
                alphas[idx[nm] - 1] = float(a)
        unchanged: tuple[int, ...] = ()
        if b.family != "float":
            mode_desc = "keep_base (not floating point)"
            segs.append(Segment(0, base_rows, "copy", 0, all_in))
            unchanged = tuple(range(1, M + 1))
        elif mode == "fuse":
            fuse_end = base_rows
            mode_desc = "fuse"
            if omni and EMBEDDING_RE.search(name) and 0 < base_vocab < base_rows and rules[NEW_TOKENS].mode != "fuse":
                fuse_end = base_vocab
            segs.append(Segment(0, fuse_end, "fuse", 0, all_in))
            if fuse_end < base_rows:
                r = rules[NEW_TOKENS]
                if r.mode == "keep_base" or owners.get(NEW_TOKENS) is None:
                    segs.append(Segment(fuse_end, base_rows, "copy", 0, all_in))
                    mode_desc += f"; rows {fuse_end}:{base_rows} (new tokens) from base"
                else:
                    segs.append(Segment(fuse_end, base_rows, "copy", idx[owners[NEW_TOKENS]], all_in))
                    mode_desc += f"; rows {fuse_end}:{base_rows} (new tokens) from {owners[NEW_TOKENS]}"
        elif mode == "keep_base":
            mode_desc = "keep_base"
            segs.append(Segment(0, base_rows, "copy", 0, all_in))
        else:  # copy
            key = next(k for p, k in prefix_rules.items() if rules[k] is rule)
            owner = owners.get(key)
            src = idx[owner] if owner else 0
            mode_desc = f"copy:{owner or 'base'}"
            segs.append(Segment(0, base_rows, "copy", src, all_in))
            unchanged = tuple(i for i in range(1, M + 1) if i != src)
        if name in growers:
            g = growers[name]
            segs.append(Segment(base_rows, rows_out, "copy", g, (g,)))
            mode_desc += f"; rows {base_rows}:{rows_out} added by {names[g]}"
            if infos[g].dtype != b.dtype:
                warnings.append(f"tensor {name}: rows added by {names[g]} are {infos[g].dtype}, converted to {b.dtype}")
        shape = (rows_out, *b.shape[1:]) if b.shape else ()
        plans.append(TensorPlan(name, b.dtype, shape, group, mode_desc, [s for s in segs if s.r1 > s.r0],
                                tuple(alphas), infos, unchanged))

    # tensors absent from the base: copied from the one specialist that adds them
    added: dict[str, int] = {}
    for m, s in enumerate(specs, 1):
        paired = set(pairs[m - 1].values())
        for name, t in s.tensors.items():
            if name in paired or name in base.tensors:
                continue
            if name in added:
                other = specs[added[name] - 1]
                raise FusionError(f"tensor {name} is absent from the base and added by both {names[added[name]]!r} "
                                  f"({other.where(name)}) and {names[m]!r} ({t.file}); it can come from one only")
            added[name] = m
    for name in sorted(added):
        m = added[name]
        t = specs[m - 1].tensors[name]
        group, _ = rule_for(name)
        plans.append(TensorPlan(name, t.dtype, t.shape, group, f"new:{names[m]}",
                                [Segment(0, t.rows, "copy", m, (m,))] if t.rows else [], tuple(cfg.alpha), {m: t}))

    grower_set = sorted(set(growers.values()))
    if len(grower_set) > 1:
        raise FusionError(f"specialists {[names[g] for g in grower_set]} each add embedding rows; new tokens can "
                          "come from one specialist only")
    if grower_set:
        file_owner = grower_set[0]
    elif omni and owners.get(NEW_TOKENS):
        file_owner = idx[owners[NEW_TOKENS]]
    else:
        file_owner = 0
    return Plan(cfg, inputs, names, plans, owners, file_owner, warnings, omni)


# ============================================================================================ writing output
class ShardedWriter:
    """Writes planned tensors into safetensors shards whose headers are known in advance, chunk by chunk.

    The caller (one thread) announces each tensor with :meth:`begin`, hands its bytes in order to :meth:`write`
    and closes it with :meth:`end`; the file work (writes, early writeback, fsync at the end of each shard) runs
    on a background thread, in order, overlapping the merge."""

    WRITEBACK_BYTES = 64 << 20  # start disk writeback of every this many bytes written (with fsync on)
    QUEUE = 8  # chunks in flight

    def __init__(self, directory: Path, tensors: list[TensorPlan], shard_size: int, fsync: bool = True) -> None:
        self.directory, self.fsync = directory, fsync
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        # within a shard: widest dtypes first, so every tensor's data starts aligned to its element size
        self.shards = [sorted(s, key=lambda t: (-DTYPES[t.dtype][1], t.name)) for s in shards]
        n = len(self.shards)
        self.filenames = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [t for s in self.shards for t in s]
        self.total_size = sum(t.nbytes for t in tensors)
        self._shard = -1
        self._remaining: dict[str, int] = {}
        self._opened = False
        # background file thread
        self._q: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._file_loop, name="fuse-writer", daemon=True)
        self._thread.start()
        self._file = None

    # ---------------------------------------------------------------- background thread
    def _file_loop(self) -> None:
        try:
            while True:
                cmd = self._q.get()
                if cmd is None or self._stop.is_set():
                    return
                kind, arg = cmd
                if kind == "open":
                    path, head = arg
                    self._file = open(path, "wb", buffering=0)
                    self._offset = self._flushed = 0
                    self._put(head)
                elif kind == "data":
                    self._put(arg.view(torch.uint8).reshape(-1).numpy())
                    if self.fsync and self._offset - self._flushed >= self.WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                        # start writing this range to disk now (asynchronously) so the fsync at the end of the
                        # shard has little left, and our output does not push the inputs out of the page cache
                        os.posix_fadvise(self._file.fileno(), self._flushed, self._offset - self._flushed,
                                         os.POSIX_FADV_DONTNEED)
                        self._flushed = self._offset
                elif kind == "close":
                    if self.fsync:
                        os.fsync(self._file.fileno())
                    self._file.close()
                    self._file = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
            self._error = e
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _put(self, buf) -> None:
        mv = memoryview(buf).cast("B")
        while mv:
            n = self._file.write(mv)
            mv = mv[n:]
            self._offset += n

    def _send(self, cmd) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise RuntimeError("the writer thread stopped")
            try:
                self._q.put(cmd, timeout=0.2)
                return
            except queue.Full:
                continue

    # ---------------------------------------------------------------- caller's side
    def _open_next(self) -> None:
        if self._opened:
            self._send(("close", None))
        self._shard += 1
        self._opened = True
        tensors = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._send(("open", (self.directory / self.filenames[self._shard], struct.pack("<Q", len(raw)) + raw)))
        self._remaining = {t.name: t.nbytes for t in tensors}
        self._current = iter(tensors)

    def begin(self, t: TensorPlan) -> None:
        if not self._opened or not self._remaining:
            self._open_next()
        expected = next(self._current)
        if expected.name != t.name:  # pragma: no cover - a programming error
            raise RuntimeError(f"writer expected {expected.name}, got {t.name}")
        self._name = t.name

    def write(self, data: torch.Tensor, owned: bool = False) -> int:
        """Queue the next bytes of the current tensor. ``owned``: the caller will not touch ``data`` again
        (otherwise it is copied first, as the caller's buffers are reused)."""
        n = data.numel() * data.element_size()
        left = self._remaining[self._name] - n
        if left < 0:  # pragma: no cover
            raise RuntimeError(f"too many bytes for {self._name}")
        data = data.contiguous()
        if not owned:
            data = data.clone()
        self._send(("data", data))
        self._remaining[self._name] = left
        return n

    def end(self) -> None:
        left = self._remaining.pop(self._name)
        if left:  # pragma: no cover
            raise RuntimeError(f"{self._name}: {left} bytes missing")

    def finish(self) -> None:
        if not self.order:  # no tensor at all: still a valid (empty) file
            self._open_next()
        if self._shard != len(self.shards) - 1 or self._remaining:  # pragma: no cover - a programming error
            raise RuntimeError("the writer did not receive every planned tensor")
        self._send(("close", None))
        self._send(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if len(self.filenames) > 1:
            weight_map = {t.name: self.filenames[i] for i, s in enumerate(self.shards) for t in s}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=30)


# ============================================================================================ the merge core
def _seed64(*parts: Any) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, specialist: str, tensor: str, start: int, n: int, p: float) -> torch.Tensor:
    """Bernoulli(1 − p) keep mask for flat elements ``[start, start + n)`` of one (specialist, tensor) delta.

    Element e is kept iff u ≥ p, where u is value ``e mod 2**20`` of ``torch.rand(2**20)`` drawn from a
    generator seeded with blake2b(seed, specialist, tensor, e // 2**20): independent of chunking and order."""
    out = torch.empty(n, dtype=torch.bool)
    e, end = start, start + n
    while e < end:
        blk = e // DARE_BLOCK
        lo = e - blk * DARE_BLOCK
        hi = min(DARE_BLOCK, end - blk * DARE_BLOCK)
        g = torch.Generator().manual_seed(_seed64(seed, specialist, tensor, blk))
        u = torch.rand(hi, generator=g)[lo:hi]
        torch.ge(u, p, out=out[e - start : e - start + (hi - lo)])
        e += hi - lo
    return out


class _Workspace:
    """Reused float32 work buffers (allocating fresh ones per chunk costs more than the arithmetic)."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = self._bufs.get(key)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = torch.empty(n, dtype=dtype)
            self._bufs[key] = b
        return b[:n]


@dataclass
class _Task:
    tensor: TensorPlan
    seg: Segment
    r0: int
    r1: int
    reads: tuple[int, ...]
    stage: str  # "main" | "thr" (TIES threshold pass over one specialist)
    spec: int = 0  # thr: the specialist
    last: bool = False  # thr: the last chunk of that specialist; main: the last chunk of the tensor
    first: bool = False  # main: the first chunk of the tensor


class _Stats:
    """Task-vector statistics accumulated chunk by chunk (float64 sums)."""

    def __init__(self, names: list[str]) -> None:
        M = len(names)
        self.names = names
        self.sumsq = [0.0] * M
        self.dot = [[0.0] * M for _ in range(M)]
        self.part: list[dict[str, float]] = [{} for _ in range(M)]
        self.layer: list[dict[str, dict[int, float]]] = [{} for _ in range(M)]
        self.numel = 0  # elements per task vector
        self._layers: dict[str, int | None] = {}

    def add(self, t: TensorPlan, gram: torch.Tensor) -> None:
        """Accumulate one chunk's Gram matrix of the task vectors (``gram[i, j] = Δ_i · Δ_j``)."""
        g = gram.double().tolist()
        M = len(g)
        layer = self._layers.get(t.name, -1)
        if layer == -1:
            m_ = LAYER_RE.search(t.name)
            layer = self._layers[t.name] = int(m_.group(1)) if m_ else None
        for i in range(M):
            s = g[i][i]
            self.sumsq[i] += s
            self.part[i][t.group] = self.part[i].get(t.group, 0.0) + s
            if layer is not None:
                lg = self.layer[i].setdefault(t.group, {})
                lg[layer] = lg.get(layer, 0.0) + s
            for j in range(i):
                self.dot[i][j] += g[i][j]
                self.dot[j][i] += g[i][j]

    def result(self) -> dict[str, Any]:
        norms = [math.sqrt(s) for s in self.sumsq]
        cos: dict[str, dict[str, float | None]] = {}
        for i, a in enumerate(self.names):
            cos[a] = {}
            for j, b in enumerate(self.names):
                if norms[i] == 0 or norms[j] == 0:
                    cos[a][b] = None
                else:
                    cos[a][b] = 1.0 if i == j else self.dot[i][j] / (norms[i] * norms[j])
        return {
            "norm": dict(zip(self.names, norms)),
            "cosine": cos,
            "part_norm": {n: {g: math.sqrt(v) for g, v in sorted(self.part[i].items())} for i, n in enumerate(self.names)},
            "layer_norm": {
                n: {g: [math.sqrt(d.get(k, 0.0)) for k in range(max(d) + 1)] for g, d in sorted(self.layer[i].items())}
                for i, n in enumerate(self.names)
            },
            "numel": self.numel,
        }


class _Reader:
    """Reads the rows each task needs from every input (and hashes them), ahead of the merge, into reused
    buffer sets: memory ≈ SETS × inputs × read_mb."""

    SETS = 3  # buffer sets: one being merged, up to two being read ahead

    def __init__(self, plan: Plan, tasks: Iterator[_Task], hash: str, io_threads: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.plan = plan
        self.tasks = tasks
        self.hash = hash
        self.fds: dict[Path, int] = {}
        self.bufs: list[dict[int, torch.Tensor]] = [{} for _ in range(self.SETS)]
        self.pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="fuse-io")
        self.free: queue.Queue = queue.Queue()
        for i in range(self.SETS):
            self.free.put(i)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.hashers: dict[tuple[int, str], Any] = {}
        self.digests: list[dict[str, tuple[str, str, list[int]]]] = [{} for _ in plan.inputs]
        self.thread = threading.Thread(target=self._run, name="fuse-reader", daemon=True)

    def start(self) -> "_Reader":
        self.thread.start()
        return self

    def _fd(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _read(self, sid: int, i: int, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        item = DTYPES[info.dtype][1] * info.row_numel
        nbytes = (r1 - r0) * item
        buf = self.bufs[sid].get(i)
        if buf is None or buf.numel() < nbytes:
            buf = self.bufs[sid][i] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        view = buf[:nbytes]
        mv = memoryview(view.numpy())
        fd, off, got = self._fd(info.file), info.offset + r0 * item, 0
        while got < nbytes:
            n = os.preadv(fd, [mv[got:]], off + got)
            if n <= 0:
                raise FusionError(f"{info.file}: tensor {info.name}: unexpected end of file (truncated?)")
            got += n
        return view

    def _run(self) -> None:
        try:
            for task in self.tasks:
                while True:
                    if self.stop.is_set():
                        return
                    try:
                        sid = self.free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                # every input of the task in parallel (reads and hashes release the GIL); the next task is
                # submitted only when this one is complete, so each tensor's hash sees its rows in order
                futures = {i: self.pool.submit(self._read_hash, sid, i, task) for i in task.reads
                           if task.r1 <= task.tensor.inputs[i].rows}
                raws = {i: f.result() for i, f in futures.items()}
                self.ready.put((task, sid, raws))
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.ready.put(e)

    def _read_hash(self, sid: int, i: int, task: _Task) -> torch.Tensor:
        info = task.tensor.inputs[i]
        raw = self._read(sid, i, info, task.r0, task.r1)
        if self.hash != "none" and task.stage == "main":
            key = (i, info.name)
            if self.hash == "sha256":
                h = self.hashers.get(key)
                if h is None:
                    h = self.hashers[key] = hashlib.sha256()
                h.update(raw.numpy())
            else:
                self.hashers[key] = zlib.crc32(raw.numpy(), self.hashers.get(key, 0))
            if task.r1 == info.rows:  # the tensor's last rows: its digest is complete
                h = self.hashers.pop(key)
                digest = h.hexdigest() if self.hash == "sha256" else f"{h:08x}"
                self.digests[i][info.name] = (digest, info.dtype, list(info.shape))
        return raw

    def get(self):
        while True:
            try:
                item = self.ready.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the reader thread died") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def release(self, sid: int) -> None:
        self.free.put(sid)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def input_hash(self, i: int) -> str | None:
        """sha256 over (name, dtype, shape, digest of the bytes) of every tensor, by name (independent of sharding);
        the per-tensor digest is a CRC32 or a sha256 (``hash``)."""
        d = self.digests[i]
        for name, info in self.plan.inputs[i].tensors.items():
            if info.nbytes == 0 and name not in d:  # zero-size tensors are never read
                d[name] = (hashlib.sha256(b"").hexdigest() if self.hash == "sha256" else "00000000", info.dtype,
                           list(info.shape))
        if len(d) != len(self.plan.inputs[i].tensors):
            return None
        h = hashlib.sha256()
        for name in sorted(d):
            digest, dtype, shape = d[name]
            h.update(f"{name}\0{dtype}\0{shape}\0{digest}\n".encode())
        return h.hexdigest()


def _typed(raw: torch.Tensor, info: TensorInfo, rows: int) -> torch.Tensor:
    return raw.view(DTYPES[info.dtype][0]).reshape(rows * info.row_numel)


def _nonfinite(plan: Plan, i: int, t: TensorPlan, raw: torch.Tensor, r0: int, rows: int) -> None:
    """Raise a clear error when ``raw`` (rows r0.. of input i) holds NaN or inf."""
    info = t.inputs[i]
    x = _typed(raw, info, rows)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        e = int(bad.nonzero()[0, 0]) + r0 * info.row_numel
        v = float(x[e - r0 * info.row_numel])
        raise FusionError(f"{info.file}: tensor {t.name} contains {'NaN' if v != v else 'inf'} (flat element {e}) "
                          f"in {plan.names[i]}")


def _ties_threshold(absbuf: torch.Tensor, k: int) -> tuple[float, int]:
    """(k-th largest value, how many of the entries equal to it are kept). Selects in place, no sort."""
    n = absbuf.numel()
    arr = absbuf.numpy()
    arr.partition(n - k)  # introselect: the k largest end up right of position n - k
    thr = float(arr[n - k])
    greater = int(np.count_nonzero(arr[n - k:] > thr))
    return thr, k - greater


class _Engine:
    def __init__(self, plan: Plan, writer: ShardedWriter | None, diagnose_only: bool) -> None:
        self.plan, self.writer, self.diagnose_only = plan, writer, diagnose_only
        cfg = plan.cfg
        self.M = len(plan.inputs) - 1
        self.ws = _Workspace()
        self.chunk = max(1, int(cfg.chunk_mb * 1e6 / 4))
        self.read_bytes = max(1, int(cfg.read_mb * 1e6))
        self.method = cfg.method
        self.use_dare = cfg.method == "dare" and cfg.dare.p > 0
        self.use_ties = cfg.method == "ties" or (cfg.method == "dare" and cfg.dare.combine == "ties")
        self.density = float(cfg.ties.density)
        self.stats = _Stats(plan.names[1:])
        self.warnings: list[str] = []
        self.counts = {"fused": 0, "copied": 0, "kept": 0, "added": 0}
        # TIES state of the current tensor
        self.absbuf: torch.Tensor | None = None
        self.thr: dict[int, tuple[float, int]] = {}
        self.eq_seen: dict[int, int] = {}

    # ---------------------------------------------------------------- task stream
    def rows_per_chunk(self, t: TensorPlan) -> int:
        """Rows merged at a time (cache-sized work buffers)."""
        return max(1, self.chunk // max(1, t.row_numel))

    def rows_per_read(self, t: TensorPlan) -> int:
        """Rows read at a time (large reads: fewer hand-offs between threads), a multiple of rows_per_chunk."""
        rpc = self.rows_per_chunk(t)
        row_bytes = t.row_numel * max(DTYPES[i.dtype][1] for i in t.inputs.values())
        return rpc * max(1, self.read_bytes // max(1, rpc * row_bytes))

    def tasks(self) -> Iterator[_Task]:
        order = self.writer.order if self.writer is not None else self.plan.tensors
        for t in order:
            segs = t.segments
            if self.diagnose_only:
                segs = [s for s in segs if s.kind == "fuse"]
                if not segs:
                    continue
            rpr = self.rows_per_read(t)
            fuse = [s for s in segs if s.kind == "fuse"]
            if self.use_ties and fuse and not self.diagnose_only and self.density < 1:
                seg = fuse[0]  # pass 1: each specialist's threshold over the fused rows
                for m in range(1, self.M + 1):
                    if t.alphas[m - 1] == 0:
                        continue
                    for r0 in range(seg.r0, seg.r1, rpr):
                        r1 = min(seg.r1, r0 + rpr)
                        yield _Task(t, seg, r0, r1, (0, m), "thr", m, last=r1 == seg.r1)
            chunks = [(s, r0, min(s.r1, r0 + rpr)) for s in segs for r0 in range(s.r0, s.r1, rpr)]
            if not chunks:  # zero-size tensor
                yield _Task(t, Segment(0, 0, "copy"), 0, 0, (), "main", first=True, last=True)
            for k, (s, r0, r1) in enumerate(chunks):
                yield _Task(t, s, r0, r1, s.reads, "main", first=k == 0, last=k == len(chunks) - 1)

    # ---------------------------------------------------------------- deltas
    def _delta(self, t: TensorPlan, m: int, raw: torch.Tensor, base_f: torch.Tensor, rows: int,
               out: torch.Tensor) -> torch.Tensor:
        """Δ_m for the rows (float32, into ``out``)."""
        s = self.ws.get("spec", base_f.numel())
        s.copy_(_typed(raw, t.inputs[m], rows))
        torch.sub(s, base_f, out=out)
        return out

    def _dare(self, t: TensorPlan, m: int, d: torch.Tensor, r0: int) -> torch.Tensor:
        p = self.plan.cfg.dare.p
        keep = dare_keep_mask(self.plan.cfg.dare.seed, self.plan.names[m], t.name, r0 * t.row_numel, d.numel(), p)
        d.mul_(keep)
        d.mul_(1.0 / (1.0 - p))
        return d

    def _trim_mask(self, m: int, d: torch.Tensor) -> torch.Tensor:
        """Keep |Δ| > threshold, and of the entries equal to it the first ``quota`` in flat index order."""
        thr, quota = self.thr[m]
        a = d.abs()
        eq = a == thr
        n_eq = int(eq.sum())
        seen = self.eq_seen[m]
        self.eq_seen[m] = seen + n_eq
        if seen + n_eq <= quota:  # every tie in these rows is still within the quota
            return a >= thr
        keep = a > thr
        if seen < quota:
            keep |= eq & (torch.cumsum(eq, 0) <= quota - seen)
        return keep

    # ---------------------------------------------------------------- per task
    def _sub_chunks(self, task: _Task, raws: dict[int, torch.Tensor]):
        """(r0, r1, raws of those rows) for the cache-sized sub-chunks of one read block."""
        t = task.tensor
        rpc = self.rows_per_chunk(t)
        for r0 in range(task.r0, task.r1, rpc):
            r1 = min(task.r1, r0 + rpc)
            sub = {}
            for i, raw in raws.items():
                rb = t.row_numel * DTYPES[t.inputs[i].dtype][1]
                sub[i] = raw[(r0 - task.r0) * rb : (r1 - task.r0) * rb]
            yield r0, r1, sub

    def run_thr(self, task: _Task, raws: dict[int, torch.Tensor]) -> None:
        t, m = task.tensor, task.spec
        seg = task.seg
        n_fused = (seg.r1 - seg.r0) * t.row_numel
        if self.absbuf is None:
            self.absbuf = torch.empty(n_fused, dtype=torch.float32)
        for r0, r1, sub in self._sub_chunks(task, raws):
            rows = r1 - r0
            n = rows * t.row_numel
            base_f = self.ws.get("base", n)
            base_f.copy_(_typed(sub[0], t.inputs[0], rows))
            d = self._delta(t, m, sub[m], base_f, rows, self.ws.get(("d", m), n))
            if self.use_dare:
                self._dare(t, m, d, r0)
            lo = (r0 - seg.r0) * t.row_numel
            torch.abs(d, out=self.absbuf[lo : lo + n])
        if task.last:
            k = max(1, math.ceil(self.density * n_fused))
            self.thr[m] = _ties_threshold(self.absbuf, k)
            self.eq_seen[m] = 0

    def run_main(self, task: _Task, raws: dict[int, torch.Tensor]) -> int:
        t, seg = task.tensor, task.seg
        written = 0
        if task.first and self.writer is not None:
            self.writer.begin(t)
        for r0, r1, sub in self._sub_chunks(task, raws):
            rows = r1 - r0
            n = rows * t.row_numel
            if seg.kind == "fuse":
                out = self._fuse(t, sub, r0, rows, n)
                if self.writer is not None:
                    written += self.writer.write(out, owned=t.dtype != "F32")  # F32: the reused accumulator
            else:
                written += self._copy(t, seg, sub, r0, rows, n)
        if task.last:
            if self.writer is not None:
                self.writer.end()
            kind = t.rule.split(":")[0].split(";")[0].split(" ")[0]
            self.counts[{"fuse": "fused", "keep_base": "kept", "copy": "copied", "new": "added"}.get(kind, "kept")] += 1
            self.absbuf = None
            self.thr.clear()
            self.eq_seen.clear()
        return written

    def _copy(self, t: TensorPlan, seg: Segment, raws: dict[int, torch.Tensor], r0: int, rows: int, n: int) -> int:
        for i, raw in raws.items():
            if t.inputs[i].family == "float":
                f = self.ws.get("check", n)
                f.copy_(_typed(raw, t.inputs[i], rows))
                if not math.isfinite(float(f.sum())):
                    _nonfinite(self.plan, i, t, raw, r0, rows)
        for i in t.unchanged:
            if i in raws and 0 in raws and not torch.equal(raws[i], raws[0]) and seg.src != i:
                msg = (f"{self.plan.names[i]} changed tensor {t.name} ({t.rule}); that change is not in the output")
                if msg not in self.warnings:
                    self.warnings.append(msg)
        if self.writer is None:
            return 0
        src = raws[seg.src]
        info = t.inputs[seg.src]
        if info.dtype == t.dtype:
            return self.writer.write(src)  # copied by the writer: the read buffer is reused
        return self.writer.write(_typed(src, info, rows).to(DTYPES[t.dtype][0]), owned=True)

    def _fuse(self, t: TensorPlan, raws: dict[int, torch.Tensor], r0: int, rows: int, n: int) -> torch.Tensor:
        M = self.M
        cfg = self.plan.cfg
        base_f = self.ws.get("base", n)
        base_f.copy_(_typed(raws[0], t.inputs[0], rows))
        # the task vectors of these rows as one contiguous [M, n] float32 matrix (cache-sized: see chunk_mb)
        D = self.ws.get("D", M * n).view(M, n)
        for m in range(1, M + 1):
            D[m - 1].copy_(_typed(raws[m], t.inputs[m], rows))
            D[m - 1].sub_(base_f)
        # squared norms and pairwise dots of the raw task vectors in one GEMM; also a free NaN/inf check of
        # every input (Δ = θ_m − θ₀ is non-finite wherever θ_m or θ₀ is)
        gram = D @ D.T
        if not bool(torch.isfinite(gram).all()):
            for i in range(M + 1):
                _nonfinite(self.plan, i, t, raws[i], r0, rows)
            gram = D.double() @ D.double().T  # finite inputs, float32 overflow of the products only
        self.stats.add(t, gram)
        self.stats.numel += n
        if self.diagnose_only:
            return base_f
        alphas = t.alphas
        acc = self.ws.get("acc", n)
        if self.method == "linear":
            w0 = float(cfg.linear.base_weight)
            total = w0 + sum(alphas)
            torch.mul(base_f, w0, out=acc)
            s = self.ws.get("spec", n)
            for m in range(1, M + 1):
                s.copy_(_typed(raws[m], t.inputs[m], rows))
                acc.add_(s, alpha=alphas[m - 1])
            acc.div_(total)
        elif self.use_ties:
            active = [m for m in range(1, M + 1) if alphas[m - 1] != 0]
            for m in active:
                if self.use_dare:
                    self._dare(t, m, D[m - 1], r0)
                if self.density < 1:
                    D[m - 1].mul_(self._trim_mask(m, D[m - 1]))
            total = self.ws.get("ties_sum", n)
            total.zero_()
            for m in active:
                total.add_(D[m - 1], alpha=alphas[m - 1])
            sign = torch.sign(total)
            num = self.ws.get("ties_num", n)
            den = self.ws.get("ties_den", n)
            num.zero_()
            den.zero_()
            for m in active:
                agree = (torch.sign(D[m - 1]) == sign) & (sign != 0)
                num.add_(D[m - 1] * agree, alpha=alphas[m - 1])
                den.add_(agree.to(torch.float32), alpha=alphas[m - 1])
            merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            torch.add(base_f, merged, alpha=float(cfg.ties.scale), out=acc)
        else:  # task arithmetic (with or without DARE); element-wise, so the result never depends on chunking
            first = True
            for m in range(1, M + 1):
                a = alphas[m - 1]
                if a == 0:
                    continue
                if self.use_dare:
                    self._dare(t, m, D[m - 1], r0)
                if first:
                    torch.add(base_f, D[m - 1], alpha=a, out=acc)
                    first = False
                else:
                    acc.add_(D[m - 1], alpha=a)
            if first:
                acc.copy_(base_f)
        return acc if t.dtype == "F32" else acc.to(DTYPES[t.dtype][0])


# ============================================================================================ entry points
@dataclass
class FuseResult:
    out: Path | None
    diagnostics: dict[str, Any]


def _record(plan: Plan, hashes: dict[str, str | None]) -> dict[str, Any]:
    cfg = plan.cfg
    params: dict[str, Any] = {}
    if cfg.method in ("ties",) or (cfg.method == "dare" and cfg.dare.combine == "ties"):
        params["ties"] = dataclasses.asdict(cfg.ties)
    if cfg.method == "dare":
        params["dare"] = dataclasses.asdict(cfg.dare)
    if cfg.method == "linear":
        params["linear"] = dataclasses.asdict(cfg.linear)
    return {
        "step": "fuse",
        "method": cfg.method,
        "params": params,
        "coefficients": dict(zip(cfg.names, cfg.alpha)),
        "parts": {k: dataclasses.asdict(v) for k, v in cfg.parts.items()},
        "owners": dict(plan.owners),
        "base": {"path": str(plan.inputs[0].path.resolve()), "hash": hashes.get("base")},
        "specialists": [
            {"name": n, "path": str(plan.inputs[i + 1].path.resolve()), "alpha": a, "hash": hashes.get(n)}
            for i, (n, a) in enumerate(zip(cfg.names, cfg.alpha))
        ],
        "hash": {"per_tensor": cfg.hash, "combined": "sha256 of the lines 'name\\0dtype\\0shape\\0per-tensor digest\\n' "
                 "of every tensor, sorted by name (independent of sharding)"},
    }


def _copy_aux_files(src: Path, dst: Path) -> None:
    skip = {WEIGHTS_INDEX_NAME, CONFIG_NAME, DIAGNOSTICS_JSON, DIAGNOSTICS_PNG}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            shutil.copy2(p, dst / p.name)


def _diagnostics(plan: Plan, engine: _Engine) -> dict[str, Any]:
    cfg = plan.cfg
    groups: dict[str, dict[str, int]] = {}
    for t in plan.tensors:
        groups.setdefault(t.rule, {"tensors": 0})
        groups[t.rule]["tensors"] += 1
    return {
        "method": cfg.method,
        "specialists": list(cfg.names),
        "alpha": dict(zip(cfg.names, cfg.alpha)),
        "task_vectors": engine.stats.result(),
        "tensors": dict(engine.counts, total=len(plan.tensors)),
        "rules": {r: g["tensors"] for r, g in sorted(groups.items())},
        "owners": dict(plan.owners),
        "files_from": plan.names[plan.file_owner],
        "warnings": plan.warnings + engine.warnings,
    }


def plot_diagnostics(diag: dict[str, Any], path: str | Path) -> Path:
    """Norms, cosine matrix and per-layer norms of the task vectors, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    tv = diag["task_vectors"]
    names = list(tv["norm"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.bar(names, [tv["norm"][n] for n in names], color="tab:blue")
    ax.set_title("task vector L2 norm")
    ax.tick_params(axis="x", rotation=30)
    ax = axes[1]
    mat = np.array([[np.nan if tv["cosine"][a][b] is None else tv["cosine"][a][b] for b in names] for a in names])
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_title("pairwise cosine")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    groups = sorted({g for n in names for g in tv["layer_norm"][n]})
    group = "language_model" if "language_model" in groups else (
        max(groups, key=lambda g: max(len(tv["layer_norm"][n].get(g, [])) for n in names)) if groups else None)
    if group is not None:
        for n in names:
            ys = tv["layer_norm"][n].get(group, [])
            ax.plot(range(len(ys)), ys, marker="o", label=n)
        ax.set_xlabel("layer")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend()
    ax.set_title(f"per-layer norm ({group})" if group else "per-layer norm (no layered tensors)")
    fig.suptitle(f"task vectors ({diag['method']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_diagnostics(diag: dict[str, Any]) -> str:
    tv = diag["task_vectors"]
    names = list(tv["norm"])
    w = max([10, *map(len, names)])
    lines = [f"task vectors over {tv['numel']:,} fused elements ({diag['method']})",
             f"{'specialist':<{w}}  {'alpha':>6}  {'L2 norm':>10}  " + "  ".join(f"{'cos ' + n:>{max(9, len(n) + 4)}}" for n in names)]
    for a in names:
        cells = []
        for b in names:
            c = tv["cosine"][a][b]
            cells.append(f"{'-' if c is None else f'{c:.4f}':>{max(9, len(b) + 4)}}")
        lines.append(f"{a:<{w}}  {diag['alpha'][a]:>6.3g}  {tv['norm'][a]:>10.4g}  " + "  ".join(cells))
    for a in names:
        for g, ys in tv["layer_norm"][a].items():
            if ys:
                lines.append(f"{a:<{w}}  per-layer norm {g}: " + " ".join(f"{y:.3g}" for y in ys))
    lines.append("tensors: " + ", ".join(f"{k} {v}" for k, v in diag["tensors"].items()))
    if diag["owners"]:
        lines.append("owners: " + ", ".join(f"{k} <- {v or 'base'}" for k, v in diag["owners"].items()))
    for wmsg in diag["warnings"]:
        lines.append(f"warning: {wmsg}")
    return "\n".join(lines)


def _run(plan: Plan, writer: ShardedWriter | None, diagnose_only: bool) -> tuple[_Engine, dict[str, str | None]]:
    cfg = plan.cfg
    engine = _Engine(plan, writer, diagnose_only)
    reader = _Reader(plan, engine.tasks(), hash="none" if diagnose_only else cfg.hash,
                     io_threads=cfg.io_threads).start()
    total = writer.total_size if writer is not None else sum(
        t.fused_rows * t.row_numel * DTYPES[t.dtype][1] for t in plan.tensors)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="diagnose" if diagnose_only else "fuse", file=sys.stderr, dynamic_ncols=True)
    n_tensors, done = len(plan.tensors), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        while True:
            item = reader.get()
            if item is None:
                break
            task, sid, raws = item
            try:
                if task.stage == "thr":
                    engine.run_thr(task, raws)
                else:
                    written = engine.run_main(task, raws)
                    if bar is not None:
                        if diagnose_only:
                            written = (task.r1 - task.r0) * task.tensor.row_numel * DTYPES[task.tensor.dtype][1]
                        bar.update(written)
                        if task.last:
                            done += 1
                            bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            finally:
                reader.release(sid)
    finally:
        torch.set_num_threads(threads)
        reader.close()
        if bar is not None:
            bar.close()
    hashes = ({plan.names[i]: reader.input_hash(i) for i in range(len(plan.inputs))}
              if cfg.hash != "none" and not diagnose_only else {})
    return engine, hashes


class _Terminate(BaseException):
    pass


def fuse(cfg: FuseConfig) -> FuseResult:
    """Fuse (or, with ``cfg.diagnose_only``, only diagnose) the specialists. See the module docstring."""
    plan = build_plan(cfg)
    if cfg.diagnose_only:
        engine, _ = _run(plan, None, True)
        diag = _diagnostics(plan, engine)
        if cfg.diagnostics_dir:
            d = Path(cfg.diagnostics_dir)
            d.mkdir(parents=True, exist_ok=True)
            from omni_lightning.utils import atomic_write_text

            atomic_write_text(d / DIAGNOSTICS_JSON, json.dumps(diag, indent=2) + "\n")
            plot_diagnostics(diag, d / DIAGNOSTICS_PNG)
        return FuseResult(None, diag)

    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite: true) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer: ShardedWriter | None = None
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):  # SLURM time limit / scancel: clean up, leave nothing behind
            raise _Terminate(f"terminated by signal {signum}")

        old_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        writer = ShardedWriter(tmp, plan.tensors, parse_size(cfg.shard_size), fsync=cfg.fsync)
        engine, hashes = _run(plan, writer, False)
        writer.finish()
        owner = plan.inputs[plan.file_owner]
        _copy_aux_files(owner.path, tmp)
        record = _record(plan, hashes)
        if owner.omni is not None:
            data = json.loads(json.dumps(owner.omni))
            data["history"] = list(data.get("history", [])) + [record]
            config = OmniConfig(**data)
            config.save(tmp)
        elif owner.hf_config is not None:
            data = dict(owner.hf_config)
            data["omni_lightning_fusion"] = record
            (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        else:
            (tmp / "fusion.json").write_text(json.dumps(record, indent=2) + "\n")
        diag = _diagnostics(plan, engine)
        diag["record"] = record
        (tmp / DIAGNOSTICS_JSON).write_text(json.dumps(diag, indent=2) + "\n")
        plot_diagnostics(diag, tmp / DIAGNOSTICS_PNG)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return FuseResult(out, diag)


def run_cli(config: str | None, overrides: dict[str, Any]) -> int:
    """``omni-lightning fuse``: load the config, fuse (or diagnose), print the diagnostics."""
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    try:
        result = fuse(cfg)
    except _Terminate as e:
        print(f"omni-lightning fuse: {e}; nothing was written", file=sys.stderr)
        return 143
    print(format_diagnostics(result.diagnostics))
    if result.out is not None:
        print(f"wrote fused model {result.out} ({cfg.method}) in {time.perf_counter() - t0:.1f} s; diagnostics in "
              f"{result.out / DIAGNOSTICS_JSON} and {result.out / DIAGNOSTICS_PNG}")
    elif cfg.diagnostics_dir:
        print(f"diagnostics written to {cfg.diagnostics_dir}")
    return 0


__all__ = [
    "DareOptions", "FuseConfig", "FuseResult", "FusionError", "LinearOptions", "METHODS", "PartRule",
    "TiesOptions", "build_plan", "dare_keep_mask", "format_diagnostics", "fuse", "load_config", "plot_diagnostics",
    "read_header", "run_cli", "validate_config",
]
