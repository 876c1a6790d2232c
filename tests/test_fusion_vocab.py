"""Token-row ownership follows the tokenizers, on a real Qwen vocabulary layout.

A real Qwen checkpoint pads its embedding matrix to 151936 rows while its tokenizer uses ids 0..151668; the
audio tokens omni-lightning adds (ids 151669..151671) land inside that padding, so counting rows cannot tell
them apart. These tests build that layout at the real vocabulary width (a narrow hidden size keeps the files
small) and check that the added rows are copied from their owner bit for bit, the rows the base's tokenizer
uses are fused, and the padding rows no tokenizer uses keep the base's values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_lightning.fusion import FuseConfig, FusionError, build_plan, fuse
from omni_lightning.model.config import AUDIO_TOKENS, OmniConfig
from omni_lightning.model.omni import load_safetensors_dir

ROWS = 151936  # Qwen2/2.5/3(-VL) embedding rows (padded)
USED = 151669  # ids the Qwen tokenizer uses (regular + special tokens)
AUDIO_IDS = {t: USED + i for i, t in enumerate(AUDIO_TOKENS)}  # 151669, 151670, 151671
HIDDEN = 32
EMB = "backbone.language_model.embed_tokens.weight"
LAYER = "backbone.language_model.layers.0.mlp.down_proj.weight"
PROJ = "projector.fc1.weight"


def write_tokenizer(d: Path, extra: list[str]) -> None:
    """A WordLevel tokenizer with ids 0..USED-1 (the last 22 special, as Qwen's), then ``extra`` added tokens."""
    from tokenizers import Tokenizer, models

    specials = [f"<|special_{i}|>" for i in range(22)]
    vocab = {f"tok{i}": i for i in range(USED - len(specials))}
    vocab.update({s: USED - len(specials) + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
    tok.add_special_tokens(list(extra))
    tok.save(str(d / "tokenizer.json"))


def omni_dir(d: Path, tensors: dict[str, torch.Tensor], history: list[dict]) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = OmniConfig(backbone_type="qwen3_vl",
                     backbone={"text_config": {"vocab_size": ROWS, "hidden_size": HIDDEN, "num_hidden_layers": 1}},
                     audio_token_ids=dict(AUDIO_IDS), base_vocab_size=ROWS, history=history)
    cfg.save(d)
    write_tokenizer(d, list(AUDIO_TOKENS))
    return d


def noisy(t: dict[str, torch.Tensor], keys: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if k in keys else v.clone()
            for k, v in t.items()}


@pytest.fixture(scope="module")
def omni_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    g = torch.Generator().manual_seed(0)
    base = {EMB: torch.randn(ROWS, HIDDEN, generator=g).to(torch.bfloat16),
            LAYER: torch.randn(HIDDEN, HIDDEN, generator=g).to(torch.bfloat16),
            PROJ: torch.randn(HIDDEN, HIDDEN, generator=g).to(torch.bfloat16)}
    init = [{"step": "init-model", "backbone": "/ckpt/Qwen3-VL-8B", "audio_encoder": "/ckpt/Qwen3-Omni", "seed": 0}]
    b = omni_dir(root / "base", base, init)
    image = noisy(base, (EMB, LAYER), 1)  # every embedding row moves, the audio rows included
    audio = noisy(base, (EMB, LAYER, PROJ), 2)
    i = omni_dir(root / "image", image, [*init, {"step": "specialist", "train_parts": ["language_model"]}])
    a = omni_dir(root / "audio", audio, [*init, {"step": "specialist", "train_parts": ["language_model", "projector"]}])
    return root, b, (i, a), base, (image, audio)


def f32_delta(s: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return s.double().numpy() - b.double().numpy()


def test_added_audio_rows_inside_the_padding_are_copied_not_fused(omni_layout, tmp_path):
    root, b, specs, base, (image, audio) = omni_layout
    alpha = [0.3, 0.5]
    res = fuse(FuseConfig(base=str(b), specialists=[str(s) for s in specs], names=["image", "audio"], alpha=alpha,
                          out=str(tmp_path / "fused"), progress=False, fsync=False))
    out = load_safetensors_dir(res.out)
    emb = out[EMB]
    assert emb.shape == (ROWS, HIDDEN)
    lo, hi = min(AUDIO_IDS.values()), max(AUDIO_IDS.values()) + 1
    # the audio tokens' rows: the audio specialist's (projector owner = new-token owner), bit for bit
    assert torch.equal(emb[lo:hi], audio[EMB][lo:hi])
    assert not torch.equal(emb[lo:hi], image[EMB][lo:hi])
    # the padding rows no tokenizer uses: the base's
    assert torch.equal(emb[hi:], base[EMB][hi:])
    # the rows the base's tokenizer uses: fused (base + Σ α Δ), computed in float64 here
    b0 = base[EMB][:lo]
    ref = b0.double().numpy() + sum(a_ * f32_delta(s[EMB][:lo], b0) for a_, s in zip(alpha, (image, audio)))
    np.testing.assert_allclose(emb[:lo].double().numpy(), ref, atol=2e-2, rtol=1e-2)
    assert not torch.equal(emb[:lo], base[EMB][:lo])
    assert torch.equal(out[PROJ], audio[PROJ])
    cfg = json.loads((Path(res.out) / "omni_config.json").read_text())
    assert cfg["history"][-1]["owners"]["new_tokens"] == "audio"


def test_the_plan_says_which_rows_come_from_where(omni_layout):
    root, b, specs, base, _ = omni_layout
    plan = build_plan(FuseConfig(base=str(b), specialists=[str(s) for s in specs], names=["image", "audio"],
                                 alpha=[0.3, 0.5], method="ties", diagnose_only=True))
    t = next(t for t in plan.tensors if t.name == EMB)
    assert [(s.r0, s.r1, s.kind, s.src) for s in t.segments] == [
        (0, USED, "fuse", 0), (USED, USED + 3, "copy", 2), (USED + 3, ROWS, "copy", 0)]
    assert f"rows {USED}:{USED + 3} (new tokens) from audio" in t.rule
    assert f"rows {USED + 3}:{ROWS} (no token) from base" in t.rule
    # new_tokens: fuse: the audio rows are fused with the rest the base's tokenizer uses
    plan = build_plan(FuseConfig(base=str(b), specialists=[str(s) for s in specs], names=["image", "audio"],
                                 alpha=[0.3, 0.5], parts={"new_tokens": {"mode": "fuse"}}, diagnose_only=True))
    t = next(t for t in plan.tensors if t.name == EMB)
    assert [(s.r0, s.r1, s.kind, s.src) for s in t.segments] == [(0, USED + 3, "fuse", 0), (USED + 3, ROWS, "copy", 0)]


def plain_dir(d: Path, tensors: dict[str, torch.Tensor], extra_tokens: list[str]) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": ROWS, "hidden_size": HIDDEN}))
    write_tokenizer(d, extra_tokens)
    return d


def test_plain_checkpoints_rows_a_specialist_tokenizer_adds_are_copied(tmp_path):
    """Plain transformers checkpoints: ids the specialist's tokenizer has and the base's lacks are that
    specialist's rows, and its tokenizer files go to the output."""
    g = torch.Generator().manual_seed(3)
    emb = "model.embed_tokens.weight"
    base = {emb: torch.randn(ROWS, HIDDEN, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(HIDDEN, generator=g).to(torch.bfloat16)}
    b = plain_dir(tmp_path / "base", base, [])
    s1 = noisy(base, (emb,), 4)
    s2 = noisy(base, (emb,), 5)
    d1 = plain_dir(tmp_path / "s1", s1, [])
    d2 = plain_dir(tmp_path / "s2", s2, ["<|new_a|>", "<|new_b|>"])
    res = fuse(FuseConfig(base=str(b), specialists=[str(d1), str(d2)], names=["s1", "s2"], alpha=[0.5, 0.5],
                          out=str(tmp_path / "out"), progress=False, fsync=False))
    out = load_safetensors_dir(res.out)[emb]
    assert torch.equal(out[USED:USED + 2], s2[emb][USED:USED + 2])
    assert torch.equal(out[USED + 2:], base[emb][USED + 2:])
    assert not torch.equal(out[:USED], base[emb][:USED])
    assert res.diagnostics["files_from"] == "s2"
    assert "<|new_b|>" in (Path(res.out) / "tokenizer.json").read_text()


def test_two_specialists_adding_the_same_id_is_an_error(tmp_path):
    g = torch.Generator().manual_seed(6)
    emb = "model.embed_tokens.weight"
    base = {emb: torch.randn(ROWS, HIDDEN, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(HIDDEN, generator=g).to(torch.bfloat16)}
    b = plain_dir(tmp_path / "base", base, [])
    d1 = plain_dir(tmp_path / "s1", noisy(base, (emb,), 7), ["<|x|>"])
    d2 = plain_dir(tmp_path / "s2", noisy(base, (emb,), 8), ["<|y|>"])
    with pytest.raises(FusionError, match=f"token id {USED} is added by both 's1' and 's2'"):
        build_plan(FuseConfig(base=str(b), specialists=[str(d1), str(d2)], names=["s1", "s2"], alpha=[0.5, 0.5], diagnose_only=True))
