"""The demo corpus: small, deterministic, generated locally, with real structure a tiny model can learn.

Every modality's pairs are (text caption → media positive), one instruction per modality, ``label`` = the
caption id (``"<family>:<id>"``; captions repeat across samples), one hard negative per sample (an item of a
*different* caption that shares attributes with the positive). Train and eval use different instances
(different source digits, positions, colours jitter, noise and phases); every eval caption also occurs in
train (eval labels ⊆ train labels).

* **image** -- scikit-learn's bundled handwritten digits (8×8, ``load_digits``; no download), upscaled to 24×24,
  placed at a random offset on a 32×32 dark background, coloured in one of 10 colours:
  ``"a red digit seven"`` (10 digits × 10 colours = 100 captions). Train and eval draw from disjoint
  pools of source digits. Hard negative: same digit in another colour, or same colour with another digit.
* **video** -- 4 frames of 32×32: a 16×16 digit moving left/right/up/down by 4-5 px per frame:
  ``"digit three moving left"`` (40 captions). Hard negative: same digit another direction, or same
  direction another digit.
* **document** -- a white page 32 high × 64 wide (8×8 patches tile it evenly), a coloured header bar (one of
  4 colours, a nuisance attribute) and a handwritten two-digit number in black: ``"page with the number 37"``
  (00-99, 100 captions). Hard negative: a number sharing one of the two digits.
* **audio** -- 1 s mono at 16 kHz: 10 pitches (mel-spaced 250-2500 Hz) × 1-5 beeps × {sine "soft",
  odd-harmonic square "harsh"}: ``"three harsh beeps at pitch seven"`` (100 captions); random onset, beep
  length, gap, amplitude, phase and a little noise. Hard negative: one attribute changed (count ±1, pitch
  ±1 or the other timbre).
* **text** -- paraphrase pairs over the same vocabulary (all 340 captions above): query = the caption,
  positive = a paraphrase (``"seven, drawn in red"``); eval uses a paraphrase template held out of train.
  Hard negative: a paraphrase of a caption differing in one attribute. Labels are shared with the media
  captions (``"image:073"`` etc.), for text-only pretraining of a base model.

**The stage-0 corpus** (``corpus="pretrain"``) stands in for the general pretraining a real VLM base has had
before anyone trains embedders on it. It holds the same **text** paraphrase pairs and, as its **image** set,
*glyphs*: a single grey train-pool digit of one of four sizes anywhere on a dark 32×32 canvas, captioned
``"a small digit seven"`` (10 digits × 4 sizes = 40 captions; labels ``"glyph:NNN"``). It teaches the base
to read digits; no colour (grey only — glyphs in random colours with colour-free captions taught colour
invariance and crippled the image specialist), no position words (captioning the quadrant taught position
sensitivity, which the position-free image task then had to unlearn), no motion, no pages, no audio — the
specialists' tasks stay to be learned. Its train split never uses eval-pool source digits.

Determinism: all randomness comes from ``numpy.random.Generator(SeedSequence([seed, modality, split]))``;
PNG/FLAC/tar encoding is byte-stable, so the same seed gives byte-identical shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from omni_lightning.data.shards import split_dir, write_shards
from omni_lightning.modalities import MODALITIES

__all__ = [
    "DEMO_INSTRUCTIONS",
    "DEMO_TASKS",
    "DEMO_SAMPLE_RATE",
    "demo_captions",
    "demo_vocabulary",
    "make_demo_data",
    "demo_samples",
]

DEMO_SAMPLE_RATE = 16000
DEMO_INSTRUCTIONS = {
    "text": "Retrieve a sentence that means the same as the given text.",
    "image": "Retrieve the image that matches the description.",
    "video": "Retrieve the video clip that shows the described motion.",
    "document": "Retrieve the document page that matches the description.",
    "audio": "Retrieve the audio clip that matches the description.",
}
PRETRAIN_INSTRUCTION = "Retrieve the picture that matches the description."
DEMO_TASKS = {
    "text": "demo_text_t2t",
    "image": "demo_image_t2i",
    "video": "demo_video_t2v",
    "document": "demo_document_t2d",
    "audio": "demo_audio_t2a",
}
_SPLIT_CODE = {"train": 0, "eval": 1, "diag": 2}  # diag: for choosing settings (α), never eval
_MOD_CODE = {m: i for i, m in enumerate(MODALITIES)}

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOURS = (
    ("red", (230, 40, 40)), ("green", (40, 200, 70)), ("blue", (60, 100, 250)), ("yellow", (240, 220, 40)),
    ("cyan", (40, 220, 230)), ("magenta", (220, 50, 220)), ("orange", (250, 140, 20)),
    ("white", (240, 240, 240)), ("pink", (255, 150, 190)), ("brown", (150, 90, 40)),
)
DIRECTIONS = ("left", "right", "up", "down")
_DIR_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
HEADER_COLOURS = ((50, 90, 200), (200, 50, 50), (40, 150, 70), (120, 120, 120))
TIMBRES = ("soft", "harsh")
PITCHES_HZ = tuple(
    float(700.0 * (10 ** (m / 2595.0) - 1.0))
    for m in np.linspace(2595.0 * np.log10(1 + 250 / 700), 2595.0 * np.log10(1 + 2500 / 700), 10)
)
EVAL_DIGIT_FRACTION = 0.25


# ----------------------------------------------------------------------------------------------------------
# captions and paraphrases
# ----------------------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _image_attrs(cid: int) -> tuple[int, int]:
    return cid // 10, cid % 10  # digit, colour


def _video_attrs(cid: int) -> tuple[int, int]:
    return cid // 4, cid % 4  # digit, direction


def _audio_attrs(cid: int) -> tuple[int, int, int]:
    return cid // 10, (cid % 10) // 2 + 1, cid % 2  # pitch index, beep count, timbre


def _caption(family: str, cid: int) -> str:
    if family == "image":
        d, c = _image_attrs(cid)
        return f"a {COLOURS[c][0]} digit {WORDS[d]}"
    if family == "video":
        d, k = _video_attrs(cid)
        return f"digit {WORDS[d]} moving {DIRECTIONS[k]}"
    if family == "document":
        return f"page with the number {cid // 10}{cid % 10}"
    if family == "audio":
        p, n, t = _audio_attrs(cid)
        return f"{WORDS[n]} {TIMBRES[t]} {_plural(n, 'beep')} at pitch {WORDS[p + 1]}"
    if family == "glyph":
        return f"a {GLYPH_SIZES[cid % 4][0]} digit {WORDS[cid // 4]}"
    raise KeyError(family)


_NUM_CAPTIONS = {"image": 100, "video": 40, "document": 100, "audio": 100, "glyph": 40}
_FAMILIES = ("image", "video", "document", "audio")  # the recipe's media families (the text space spans them)
GLYPH_SIZES = (("tiny", 10), ("small", 14), ("large", 20), ("huge", 26))  # caption word, pixels
CORPORA = ("recipe", "pretrain")
PRETRAIN_MODALITIES = ("text", "image")


def _paraphrases(family: str, cid: int) -> list[str]:
    """Paraphrase templates of a caption; the LAST one is held out for eval."""
    if family == "image":
        d, c = _image_attrs(cid)
        d, c = WORDS[d], COLOURS[c][0]
        return [f"{d}, drawn in {c}", f"the digit {d} in {c}", f"a {c} {d}", f"a handwritten {d} coloured {c}"]
    if family == "video":
        d, k = _video_attrs(cid)
        d, k = WORDS[d], DIRECTIONS[k]
        return [f"a {d} that moves {k}", f"{d} sliding {k}", f"the digit {d} travels {k}",
                f"a clip of a {d} going {k}"]
    if family == "document":
        num = f"{cid // 10}{cid % 10}"
        return [f"a page showing {num}", f"{num} written on a page", f"document page, number {num}",
                f"a sheet with {num} on it"]
    if family == "audio":
        p, n, t = _audio_attrs(cid)
        pw, nw, tw = WORDS[p + 1], WORDS[n], TIMBRES[t]
        return [f"{nw} {tw} {_plural(n, 'tone')} at pitch {pw}", f"pitch {pw}: {nw} {tw} {_plural(n, 'beep')}",
                f"{nw} {_plural(n, 'beep')}, {tw}, pitch {pw}",
                f"a clip with {nw} {tw} {_plural(n, 'beep')} of pitch {pw}"]
    raise KeyError(family)


def demo_captions() -> dict[str, list[str]]:
    """Canonical captions per media family (index = caption id)."""
    return {f: [_caption(f, i) for i in range(_NUM_CAPTIONS[f])] for f in _FAMILIES}


def demo_vocabulary() -> list[str]:
    """Every string the demo corpus can contain (captions, paraphrases, instructions), sorted, unique.
    Used to train the tiny preset's tokenizer."""
    out = set(DEMO_INSTRUCTIONS.values()) | {PRETRAIN_INSTRUCTION}
    out.update(_caption("glyph", i) for i in range(_NUM_CAPTIONS["glyph"]))
    for f in _FAMILIES:
        for i in range(_NUM_CAPTIONS[f]):
            out.add(_caption(f, i))
            out.update(_paraphrases(f, i))
    return sorted(out)


def _label(family: str, cid: int) -> str:
    return f"{family}:{cid:03d}"


def _hard_negative_caption(family: str, cid: int, rng: np.random.Generator) -> int:
    """A different caption id that shares attributes with ``cid``."""
    if family == "image":
        d, c = _image_attrs(cid)
        if rng.random() < 0.5:
            c = (c + int(rng.integers(1, 10))) % 10
        else:
            d = (d + int(rng.integers(1, 10))) % 10
        return d * 10 + c
    if family == "video":
        d, k = _video_attrs(cid)
        if rng.random() < 0.5:
            k = (k + int(rng.integers(1, 4))) % 4
        else:
            d = (d + int(rng.integers(1, 10))) % 10
        return d * 4 + k
    if family == "document":
        tens, units = cid // 10, cid % 10
        if rng.random() < 0.5:
            units = (units + int(rng.integers(1, 10))) % 10
        else:
            tens = (tens + int(rng.integers(1, 10))) % 10
        return tens * 10 + units
    if family == "audio":
        p, n, t = _audio_attrs(cid)
        r = rng.random()
        if r < 1 / 3:
            n = n + 1 if n == 1 else n - 1 if n == 5 else n + int(rng.choice([-1, 1]))
        elif r < 2 / 3:
            p = p + 1 if p == 0 else p - 1 if p == 9 else p + int(rng.choice([-1, 1]))
        else:
            t = 1 - t
        return p * 10 + (n - 1) * 2 + t
    if family == "glyph":
        d, q = cid // 4, cid % 4
        if rng.random() < 0.5:
            q = (q + int(rng.integers(1, 4))) % 4
        else:
            d = (d + int(rng.integers(1, 10))) % 10
        return d * 4 + q
    raise KeyError(family)


# ----------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


class _DigitPool:
    """Source digits per class, split into disjoint train / eval pools by the seed (``diag`` draws new instances
    from the train pool: settings chosen on it never see an eval source digit)."""

    def __init__(self, seed: int, split: str):
        images, target = _digits()
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1000]))  # same split for train and eval
        self.images = images
        self.pool: list[np.ndarray] = []
        for d in range(10):
            idx = rng.permutation(np.flatnonzero(target == d))
            n_eval = int(round(len(idx) * EVAL_DIGIT_FRACTION))
            self.pool.append(np.sort(idx[:n_eval] if split == "eval" else idx[n_eval:]))

    def draw(self, digit: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        i = int(self.pool[digit][rng.integers(len(self.pool[digit]))])
        return self.images[i], i


@lru_cache(maxsize=8)
def _interp_matrix(size: int) -> np.ndarray:
    """[size, 8] bilinear interpolation weights from 8 source pixels to ``size`` output pixels."""
    src = np.linspace(0.0, 7.0, size)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, 7)
    w = src - i0
    m = np.zeros((size, 8))
    m[np.arange(size), i0] += 1 - w
    m[np.arange(size), i1] += w
    return m


def _upscale(img8: np.ndarray, size: int) -> np.ndarray:
    """8×8 intensity in [0, 1] → size×size, bilinear (deterministic, numpy only)."""
    m = _interp_matrix(size)
    return np.clip(m @ img8.astype(np.float64) @ m.T, 0.0, 1.0).astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _render_image(cid: int, pool: _DigitPool, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    digit, colour = _image_attrs(cid)
    src, src_id = pool.draw(digit, rng)
    glyph = _upscale(src, 24)
    canvas = np.zeros((32, 32), np.float32)
    y, x = rng.integers(0, 9, size=2)
    canvas[y:y + 24, x:x + 24] = glyph
    bg = rng.uniform(0, 35, size=3).astype(np.float32)
    fg = np.asarray(COLOURS[colour][1], np.float32) * rng.uniform(0.85, 1.0)
    img = bg + canvas[..., None] * (fg - bg)
    img += 4.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return _to_uint8(img), src_id


def _render_glyph(cid: int, pool: _DigitPool, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A grey digit of the captioned size anywhere on a dark 32×32 canvas."""
    digit, size = cid // 4, GLYPH_SIZES[cid % 4][1]
    src, src_id = pool.draw(digit, rng)
    glyph = _upscale(src, size)
    canvas = np.zeros((32, 32), np.float32)
    y, x = (int(v) for v in rng.integers(0, 32 - size + 1, size=2))
    canvas[y:y + size, x:x + size] = glyph
    # grey ink on a dark grey ground: no hue at all, so stage 0 neither teaches colour nor teaches to ignore it
    bg = np.full(3, rng.uniform(0, 35), np.float32)
    fg = np.full(3, rng.uniform(150, 255), np.float32)
    img = bg + canvas[..., None] * (fg - bg) + 4.0 * rng.standard_normal((32, 32, 3), dtype=np.float32)
    return _to_uint8(img), src_id


def _render_video(cid: int, pool: _DigitPool, rng: np.random.Generator, frames: int = 4) -> tuple[np.ndarray, int]:
    digit, direction = _video_attrs(cid)
    src, src_id = pool.draw(digit, rng)
    glyph = _upscale(src, 16)
    step = int(rng.integers(4, 6))
    dy, dx = _DIR_STEP[DIRECTIONS[direction]]
    travel = step * (frames - 1)
    lo, hi = 0, 16  # top-left corner range for a 16×16 glyph in 32×32

    def start(d: int) -> int:
        if d > 0:
            return int(rng.integers(lo, hi - travel + 1))
        if d < 0:
            return int(rng.integers(lo + travel, hi + 1))
        return int(rng.integers(lo, hi + 1))

    y0, x0 = start(dy), start(dx)
    bg = rng.uniform(0, 30, size=3).astype(np.float32)
    fg = np.full(3, rng.uniform(200, 250), np.float32)
    canvas = np.zeros((frames, 32, 32), np.float32)
    for t in range(frames):
        y, x = y0 + dy * step * t, x0 + dx * step * t
        canvas[t, y:y + 16, x:x + 16] = glyph
    video = bg + canvas[..., None] * (fg - bg) + 3.0 * rng.standard_normal((frames, 32, 32, 3), dtype=np.float32)
    out = _to_uint8(video)
    return out, src_id


def _render_document(cid: int, pool: _DigitPool, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    tens, units = cid // 10, cid % 10
    page = np.full((32, 64, 3), rng.uniform(235, 255), np.float32)
    header = np.asarray(HEADER_COLOURS[int(rng.integers(len(HEADER_COLOURS)))], np.float32)
    page[0:5] = header
    ink = np.float32(rng.uniform(0, 40))
    ids = []
    for d, x_lo in ((tens, 3), (units, 34)):
        src, src_id = pool.draw(d, rng)
        ids.append(src_id)
        glyph = _upscale(src, 24)
        y = int(rng.integers(6, 9))
        x = x_lo + int(rng.integers(0, 6))
        region = page[y:y + 24, x:x + 24]
        region[:] = region + glyph[..., None] * (ink - region)
    page += 3.0 * rng.standard_normal(page.shape, dtype=np.float32)
    return _to_uint8(page), ids


def _render_audio(cid: int, rng: np.random.Generator, sr: int = DEMO_SAMPLE_RATE) -> np.ndarray:
    pitch, count, timbre = _audio_attrs(cid)
    f0 = PITCHES_HZ[pitch] * rng.uniform(0.985, 1.015)
    n_total = sr  # 1 s
    wav = np.zeros(n_total, np.float64)
    durs = rng.uniform(0.07, 0.10, size=count)
    gaps = rng.uniform(0.06, 0.09, size=max(count - 1, 0))
    span = durs.sum() + gaps.sum()
    onset = rng.uniform(0.02, max(0.021, 1.0 - span - 0.02))
    amp = rng.uniform(0.25, 0.6)
    ramp = int(0.005 * sr)
    harmonics = (1,) if timbre == 0 else tuple(k for k in (1, 3, 5, 7, 9, 11) if k * f0 < 0.45 * sr)
    ks = np.asarray(harmonics, np.float64)[:, None]
    t0 = onset
    for i in range(count):
        a, n = int(t0 * sr), int(durs[i] * sr)
        n = min(n, n_total - a)
        t = np.arange(n) / sr
        phase = rng.uniform(0, 2 * np.pi)
        tone = (np.sin(ks * (2 * np.pi * f0 * t + phase)) / ks).sum(axis=0)
        if timbre == 1:
            tone = tone / 1.2
        env = np.ones(n)
        r = min(ramp, n // 2)
        env[:r] = np.arange(r) / r
        env[n - r:] = np.arange(r, 0, -1) / r
        wav[a:a + n] += amp * env * tone
        t0 += durs[i] + (gaps[i] if i < count - 1 else 0)
    wav += rng.uniform(0.003, 0.01) * rng.standard_normal(n_total, dtype=np.float32)
    return np.clip(wav, -0.99, 0.99).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------------------


def _caption_schedule(n_captions: int, n_train: int, n: int, seed: int, modality: str, split: str) -> np.ndarray:
    """Caption ids for ``n`` samples: balanced over the captions used in train (eval ⊆ train)."""
    code = _MOD_CODE[modality]
    order = np.random.default_rng(np.random.SeedSequence([seed, code, 2000])).permutation(n_captions)
    used = order[: max(1, min(n_captions, n_train))]
    rng = np.random.default_rng(np.random.SeedSequence([seed, code, 2001, _SPLIT_CODE[split]]))
    return rng.permutation(used[np.arange(n) % len(used)])


def demo_samples(modality: str, split: str, n: int, *, seed: int = 0, n_train: int | None = None,
                 corpus: str = "recipe") -> Iterator[dict]:
    """Generate ``n`` DITEM-style samples of one modality/split (deterministic in ``seed``).

    ``n_train`` (default ``n``) is the train size the caption schedule is balanced for; pass the train size
    when generating eval so that eval captions ⊆ train captions. ``corpus="pretrain"`` gives the stage-0
    corpus (text paraphrases and glyph images; see the module docstring).
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    if modality not in (PRETRAIN_MODALITIES if corpus == "pretrain" else MODALITIES):
        allowed = PRETRAIN_MODALITIES if corpus == "pretrain" else MODALITIES
        raise ValueError(f"unknown modality {modality!r} for the {corpus} corpus; expected one of {allowed}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {tuple(_SPLIT_CODE)}, got {split!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n_train = n if n_train is None else n_train
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MOD_CODE[modality], _SPLIT_CODE[split]]))
    instruction, task = DEMO_INSTRUCTIONS[modality], DEMO_TASKS[modality]

    if modality == "text":
        # all (family, cid) pairs form one caption space
        space = [(f, i) for f in _FAMILIES for i in range(_NUM_CAPTIONS[f])]
        sched = _caption_schedule(len(space), n_train, n, seed, modality, split)
        for j in sched:
            fam, cid = space[int(j)]
            paras = _paraphrases(fam, cid)
            pos = paras[-1] if split == "eval" else paras[int(rng.integers(len(paras) - 1))]
            neg_cid = _hard_negative_caption(fam, cid, rng)
            neg_paras = _paraphrases(fam, neg_cid)
            neg = neg_paras[-1] if split == "eval" else neg_paras[int(rng.integers(len(neg_paras) - 1))]
            yield {
                "task": task, "modality": "text", "instruction": instruction,
                "query": {"type": "text", "text": _caption(fam, cid)},
                "pos": {"type": "text", "text": pos},
                "negs": [{"type": "text", "text": neg}],
                "label": _label(fam, cid),
                "meta": {"caption": _caption(fam, cid), "neg_labels": [_label(fam, neg_cid)]},
            }
        return

    pool = _DigitPool(seed, split) if modality in ("image", "video", "document") else None
    render: Callable[[int], tuple[dict, Any]]
    family = "glyph" if corpus == "pretrain" else modality
    if family == "glyph":
        rng = np.random.default_rng(np.random.SeedSequence([seed, _MOD_CODE[modality], _SPLIT_CODE[split], 7]))
        instruction, task = PRETRAIN_INSTRUCTION, "pretrain_glyph_t2i"

        def render(c):
            img, src = _render_glyph(c, pool, rng)
            return {"type": "image", "image": img}, src
    elif modality == "image":
        def render(c):
            img, src = _render_image(c, pool, rng)
            return {"type": "image", "image": img}, src
    elif modality == "video":
        def render(c):
            frames, src = _render_video(c, pool, rng)
            return {"type": "video", "frames": frames}, src
    elif modality == "document":
        def render(c):
            page, src = _render_document(c, pool, rng)
            return {"type": "document", "image": page}, src
    else:
        def render(c):
            return {"type": "audio", "waveform": _render_audio(c, rng), "sample_rate": DEMO_SAMPLE_RATE}, None

    sched = _caption_schedule(_NUM_CAPTIONS[family], n_train, n, seed, modality, split)
    for cid in sched:
        cid = int(cid)
        pos, src = render(cid)
        neg_cid = _hard_negative_caption(family, cid, rng)
        neg, neg_src = render(neg_cid)
        meta: dict[str, Any] = {"caption": _caption(family, cid), "neg_labels": [_label(family, neg_cid)]}
        if src is not None:
            meta["source_digits"] = src if isinstance(src, list) else [src]
        yield {
            "task": task, "modality": modality, "instruction": instruction,
            "query": {"type": "text", "text": _caption(family, cid)},
            "pos": pos,
            "negs": [neg],
            "label": _label(family, cid),
            "meta": meta,
        }


def make_demo_data(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 1200, n_eval: int = 300,
                   modalities: Sequence[str] | None = None, overwrite: bool = False, max_per_shard: int = 400,
                   progress: bool = False, workers: int | None = 2, corpus: str = "recipe",
                   n_diag: int = 0) -> dict[str, Any]:
    """Write the demo corpus to ``out_dir/<modality>/{train,eval}/`` and ``out_dir/demo.json``; with ``n_diag``,
    also a ``diag`` split (new instances of train-pool source digits, disjoint from train and eval samples) for
    choosing settings such as the fusion coefficients without looking at eval.

    Deterministic: the same arguments give byte-identical shards. Defaults: 1200 train samples per modality
    (3 shards of 400) and 300 eval samples (1 shard). Existing split directories are refused unless
    ``overwrite=True`` (checked for all modalities before anything is generated). ``workers`` threads
    generate (modality, split) sets in parallel (the bytes do not depend on it; None = CPU count).
    Returns a summary dict (also written as ``demo.json``). ``corpus="pretrain"`` writes the stage-0 corpus
    (modalities text and image) instead of the recipe's.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    allowed = PRETRAIN_MODALITIES if corpus == "pretrain" else MODALITIES
    modalities = tuple(allowed if modalities is None else modalities)
    bad = [m for m in modalities if m not in allowed]
    if bad:
        raise ValueError(f"unknown modalities {bad} for the {corpus} corpus; expected a subset of {allowed}")
    if n_train < 1 or n_eval < 0 or n_diag < 0:
        raise ValueError(f"n_train must be >= 1 and n_eval, n_diag >= 0 (got {n_train}, {n_eval}, {n_diag})")
    root = Path(out_dir)
    splits = [("train", n_train)] + [(s, n) for s, n in (("eval", n_eval), ("diag", n_diag)) if n > 0]
    if not overwrite:
        existing = [str(split_dir(root, m, s)) for m in modalities for s, _ in splits if split_dir(root, m, s).exists()]
        if existing:
            raise FileExistsError(f"demo data already exists at {existing}; pass overwrite=True to replace it")
    _digits()  # load once before threads start
    jobs = [(m, split, n) for m in modalities for split, n in splits]

    def run(job: tuple[str, str, int]) -> dict[str, Any]:
        m, split, n = job
        labels: set[str] = set()

        def tracked(it):
            for s in it:
                labels.add(s["label"])
                yield s

        index = write_shards(tracked(demo_samples(m, split, n, seed=seed, n_train=n_train, corpus=corpus)), root, m, split,
                             max_per_shard=max_per_shard, overwrite=overwrite, progress=progress, total=n)
        return {"dir": f"{m}/{split}", "num_samples": index["num_samples"], "num_shards": len(index["shards"]),
                "num_labels": len(labels)}

    # Every (modality, split) has its own RNG stream and directory, so threads do not change the bytes;
    # PNG/FLAC encoding and large numpy ops release the GIL, which makes 2 threads worthwhile on 2 cores.
    workers = max(1, min(int(workers if workers is not None else (os.cpu_count() or 1)), len(jobs)))
    if workers == 1:
        results = [run(j) for j in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(run, jobs))
    summary: dict[str, Any] = {"seed": seed, "corpus": corpus, "n_train": n_train, "n_eval": n_eval, "n_diag": n_diag,
                               "max_per_shard": max_per_shard, "modalities": {}}
    for m in modalities:
        if corpus == "pretrain" and m == "image":
            task, instruction, n_captions = "pretrain_glyph_t2i", PRETRAIN_INSTRUCTION, _NUM_CAPTIONS["glyph"]
        else:
            task, instruction = DEMO_TASKS[m], DEMO_INSTRUCTIONS[m]
            n_captions = sum(_NUM_CAPTIONS[f] for f in _FAMILIES) if m == "text" else _NUM_CAPTIONS[m]
        summary["modalities"][m] = {"task": task, "instruction": instruction, "seed": seed, "num_captions": n_captions}
    for (m, split, _), res in zip(jobs, results):
        summary["modalities"][m][split] = res
    # demo.json describes everything under root: keep entries of modalities this call did not regenerate
    manifest = root / "demo.json"
    on_disk: dict[str, Any] = {}
    if manifest.is_file():
        try:
            on_disk = json.loads(manifest.read_text(encoding="utf-8")).get("modalities", {})
        except (ValueError, AttributeError):
            on_disk = {}
    merged = dict(summary, modalities={**{k: v for k, v in on_disk.items() if k not in modalities},
                                       **summary["modalities"]})
    manifest.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return dict(summary, root=str(root))

