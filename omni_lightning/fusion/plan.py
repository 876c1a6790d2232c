"""The plan: which tensor of the output comes from which inputs, by which rule (ownership)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from omni_lightning.fusion.checkpoint import (
    DTYPES,
    EMBEDDING_RE,
    LAYER_RE,
    Checkpoint,
    TensorInfo,
    architecture,
)
from omni_lightning.fusion.config import (
    GRAFT_PARTS,
    NEW_TOKENS,
    FuseConfig,
    FusionError,
    PartRule,
    validate_config,
)
from omni_lightning.model.config import CONFIG_NAME, expand_parts
from omni_lightning.utils import check_output_apart


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


def tokenizer_vocab(directory: Path) -> dict[str, int] | None:
    """Token -> id of a directory's tokenizer (``tokenizer.json``, else ``vocab.json`` + ``added_tokens.json``),
    read as JSON; ``None`` when the directory holds no tokenizer."""
    tj = directory / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        model_vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], the id is the index
            vocab = {str(p[0]): i for i, p in enumerate(model_vocab)}
        else:
            vocab = {str(k): int(v) for k, v in model_vocab.items()}
        for t in data.get("added_tokens") or []:
            vocab[str(t["content"])] = int(t["id"])
        return vocab
    vj = directory / "vocab.json"
    if vj.is_file():
        vocab = {str(k): int(v) for k, v in json.loads(vj.read_text(encoding="utf-8")).items()}
        at = directory / "added_tokens.json"
        if at.is_file():
            vocab.update({str(k): int(v) for k, v in json.loads(at.read_text(encoding="utf-8")).items()})
        return vocab
    return None


@dataclass
class TokenRows:
    """Who owns which rows of the token-embedding matrices (ownership follows the tokenizers, not row counts).

    ``new``: row id -> input index whose rows are copied (ids a specialist's tokenizer has and the base's lacks;
    for omni model directories also the audio tokens and every id from ``base_vocab_size`` on, owned by the
    ``new_tokens`` owner); ``used``: rows the base's tokenizer can emit (``None``: unknown, every row counts).
    Rows beyond ``used`` that no tokenizer adds (the padding of a real vocabulary) keep the base's values."""

    new: dict[int, int]
    used: int | None
    names: dict[int, str]  # input index -> name (for the rule text)
    tail: tuple[int, int] | None = None  # omni: (base_vocab_size, owner): rows the assembly appended

    def segments(self, rows: int, all_in: tuple[int, ...]) -> list[Segment]:
        label: list[tuple[str, int]] = [("fuse", 0)] * rows
        if self.used is not None:
            for r in range(min(self.used, rows), rows):
                label[r] = ("pad", 0)
        if self.tail is not None:
            for r in range(min(self.tail[0], rows), rows):
                label[r] = ("new", self.tail[1])
        for r, src in self.new.items():
            if r < rows:
                label[r] = ("new", src)
        segs: list[Segment] = []
        self._kinds: dict[int, str] = {}
        start = 0
        for r in range(1, rows + 1):
            if r == rows or label[r] != label[start]:
                kind, src = label[start]
                segs.append(Segment(start, r, "fuse" if kind == "fuse" else "copy", src, all_in))
                self._kinds[start] = kind
                start = r
        return segs

    def describe(self, segs: list[Segment]) -> str:
        kinds = getattr(self, "_kinds", {})
        return "; ".join(f"rows {s.r0}:{s.r1} ({'new tokens' if kinds.get(s.r0) == 'new' else 'no token'}) from "
                         f"{self.names.get(s.src, 'base')}" for s in segs if s.kind == "copy")


def token_rows(base: Checkpoint, specs: list[Checkpoint], names: list[str], omni_owner: int | None,
               omni_copy: bool) -> TokenRows:
    """The ownership of token rows (see :class:`TokenRows`). ``omni_owner``: input index of the ``new_tokens``
    owner (0 or None: keep the base's); ``omni_copy``: the ``new_tokens`` rule copies (does not fuse)."""
    base_vocab = tokenizer_vocab(base.path)
    new: dict[int, int] = {}
    if base_vocab is not None:
        for m, s in enumerate(specs, 1):
            sv = tokenizer_vocab(s.path)
            if sv is None:
                continue
            for tok, i in sv.items():
                if tok in base_vocab:
                    continue
                if i in new and new[i] != m:
                    raise FusionError(f"token id {i} is added by both {names[new[i]]!r} and {names[m]!r} (their "
                                      "tokenizers have it, the base's lacks it); new tokens can come from one "
                                      "specialist only")
                new[i] = m
    used = max(base_vocab.values(), default=-1) + 1 if base_vocab is not None else None
    tail = None
    if base.omni is not None and omni_copy:
        owner = omni_owner or 0
        # the audio tokens the assembly added to the backbone's tokenizer: wherever they fall (a real Qwen
        # vocabulary has them inside its padded embedding matrix), and the rows it appended
        for i in (base.omni.get("audio_token_ids") or {}).values():
            new[int(i)] = owner
        nb = int(base.omni.get("base_vocab_size", 0) or 0)
        if nb > 0:
            tail = (nb, owner)
    return TokenRows(new, used, {i: n for i, n in enumerate(names)}, tail)


def build_plan(cfg: FuseConfig) -> Plan:
    """Open every input's headers and decide, per tensor, what the output holds. Reads no tensor data."""
    validate_config(cfg)
    given = {"base model": cfg.base, **{f"specialist {n!r}": s for n, s in zip(cfg.names, cfg.specialists)}}
    for out, what in ((cfg.out, "--out"), (cfg.diagnostics_dir if cfg.diagnose_only else None, "--diagnostics_dir")):
        if out:  # before anything is read: an output that is, holds or lies inside an input would destroy it
            try:
                check_output_apart(out, given, what)
            except ValueError as e:
                raise FusionError(str(e)) from None
    base = Checkpoint(cfg.base, "base model")
    specs = [Checkpoint(p, f"specialist {n!r}") for p, n in zip(cfg.specialists, cfg.names)]
    inputs = [base, *specs]
    names = ["base", *cfg.names]
    M = len(specs)
    warnings: list[str] = []

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
    tok_rows: TokenRows | None = None
    if any(EMBEDDING_RE.search(n) for n in base.tensors):
        nt_owner = owners.get(NEW_TOKENS) if omni else None
        keep = omni and (rules[NEW_TOKENS].mode == "keep_base" or nt_owner is None)
        tok_rows = token_rows(base, specs, names, 0 if keep else idx.get(nt_owner or "", 0),
                              omni and rules[NEW_TOKENS].mode != "fuse")

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
        elif mode == "fuse" and tok_rows is not None and EMBEDDING_RE.search(name):
            # token rows: ownership follows the tokenizers (model-directory ids, not row counts)
            segs = tok_rows.segments(base_rows, all_in)
            mode_desc = "fuse"
            extra = tok_rows.describe(segs)
            if extra:
                mode_desc += "; " + extra
            n_fuse = sum(1 for s_ in segs if s_.kind == "fuse")
            if n_fuse > 1 and (cfg.method == "ties" or (cfg.method == "dare" and cfg.dare.combine == "ties")):
                raise FusionError(f"tensor {name}: the new-token rows ({extra}) split the fused rows into {n_fuse} "
                                  f"runs; {cfg.method} computes one threshold over one run: use task_arithmetic, "
                                  "or set parts.new_tokens.mode: fuse")
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
    elif not omni and tok_rows is not None and {m for m in tok_rows.new.values() if m}:
        # a specialist whose tokenizer adds tokens inside the base's padded rows: its tokenizer files go out
        file_owner = min(m for m in tok_rows.new.values() if m)
    else:
        file_owner = 0
    return Plan(cfg, inputs, names, plans, owners, file_owner, warnings, omni)



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
