"""The fusion config: methods, coefficients, part rules (``configs/fuse.yaml`` documents every key)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_lightning.model.config import PART_GROUPS

METHODS = ("task_arithmetic", "ties", "dare", "linear")
PART_MODES = ("fuse", "keep_base", "copy")
NEW_TOKENS = "new_tokens"  # pseudo-part: the embedding rows from base_vocab_size on (omni model dirs)
GRAFT_PARTS = PART_GROUPS["audio"]  # parts grafted onto the base VLM: copied from their owner by default
HASHES = ("crc32", "sha256", "none")
# config keys whose values in a model's config describe its architecture (vocab sizes may differ)
STRUCTURAL_KEYS = frozenset({
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "depth", "num_heads", "patch_size", "spatial_merge_size",
    "temporal_patch_size", "out_hidden_size", "d_model", "encoder_layers", "encoder_attention_heads",
    "encoder_ffn_dim", "num_mel_bins", "output_dim", "n_layer", "n_embd", "n_head", "num_layers", "n_inner",
    "num_experts", "moe_intermediate_size", "tie_word_embeddings",
})



class FusionError(ValueError):
    """A bad input or configuration, found before the destination is touched."""


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
