"""Stage 0 of the embedded default: the stage-0 corpus and the pretrain phase."""

from __future__ import annotations

import numpy as np
import pytest

from omni_lightning.data.shards import iter_samples
from omni_lightning.demo.corpus import (
    EVAL_DIGIT_FRACTION,
    GLYPH_SIZES,
    PRETRAIN_INSTRUCTION,
    WORDS,
    _DigitPool,
    demo_samples,
    demo_vocabulary,
    make_demo_data,
)


@pytest.fixture(scope="module")
def pretrain_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    make_demo_data(root, corpus="pretrain", n_train=64, n_eval=24, max_per_shard=32)
    return root


def test_glyph_corpus_structure(pretrain_root):
    vocab = set(demo_vocabulary())
    train = list(iter_samples(pretrain_root / "image" / "train"))
    evals = list(iter_samples(pretrain_root / "image" / "eval"))
    assert len(train) == 64 and len(evals) == 24
    eval_pool = {int(i) for d in range(10) for i in _DigitPool(0, "eval").pool[d]}
    for s in train + evals:
        cid = int(s["label"].split(":")[1])
        digit, (size_word, size) = cid // 4, GLYPH_SIZES[cid % 4]
        assert s["label"].startswith("glyph:") and s["instruction"] == PRETRAIN_INSTRUCTION
        assert s["query"]["text"] == f"a {size_word} digit {WORDS[digit]}" and s["query"]["text"] in vocab
        img = s["pos"]["image"].astype(float)
        assert np.abs(img - img.mean(-1, keepdims=True)).max() <= 16  # grey: channels agree up to noise
        # the glyph's ink spans about the captioned size (the digit's box is size × size)
        ink = img.mean(-1) > img.mean() + 2 * img.mean(-1).std()
        ys, xs = np.nonzero(ink)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert 0.4 * size <= extent <= size + 2, (s["key"], size, extent)
        assert s["meta"]["neg_labels"][0] != s["label"]
    # the train split never touches eval-pool source digits (those are the recipe's eval digits)
    assert not {d for s in train for d in s["meta"]["source_digits"]} & eval_pool
    assert 0 < EVAL_DIGIT_FRACTION < 1
    # text pairs are the recipe's paraphrases
    text = list(iter_samples(pretrain_root / "text" / "train"))
    assert [s["query"] for s in text] == [s["query"] for s in demo_samples("text", "train", 64, n_train=64)]


def test_pretrain_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="pretrain corpus"):
        make_demo_data(tmp_path, corpus="pretrain", modalities=["audio"])
    with pytest.raises(ValueError, match="corpus must be one of"):
        make_demo_data(tmp_path, corpus="stage0")


def test_pretrain_phase_trains_backbone_only(tiny_model_dir, pretrain_root, tmp_path):
    from conftest import fit_args

    from omni_lightning.app.fit import lightning_cli
    from omni_lightning.app.pipeline import config_path
    from omni_lightning.model.config import OmniConfig
    from omni_lightning.model.omni import load_safetensors_dir

    out = tmp_path / "base"
    lightning_cli(fit_args(config_path("pretrain.yaml"), tiny_model_dir, pretrain_root, out))
    before, after = load_safetensors_dir(tiny_model_dir), load_safetensors_dir(out)
    cfg = OmniConfig.load(out)
    changed = {k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())}
    backbone = (cfg.parts["language_model"], cfg.parts["vision_encoder"])
    assert changed and all(k.startswith(backbone) for k in changed)
    assert any(k.startswith(cfg.parts["vision_encoder"]) for k in changed)
    assert cfg.history[-1]["step"] == "pretrain"
