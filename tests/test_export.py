"""Shareable folders: transformers' Auto classes, sentence-transformers, the backbone alone, the model card.

Every load path is compared with ``OmniEmbedder.encode`` on the same inputs (max abs difference <= 1e-5).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import demo_items

import omni_lightning.model  # noqa: F401  (registers the omni_embedder model type)
from omni_lightning.model import OmniEmbedder, load_model_and_processor

TOL = 1e-5
INSTR = "Find the matching item."


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a recipe in its history (as a fused + recovered model would have)."""
    d = tmp_path_factory.mktemp("trained") / "final"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "omni_config.json").read_text())
    cfg["history"] += [
        {"step": "fuse", "method": "task_arithmetic", "coefficients": {"image": 0.3, "audio": 0.5},
         "owners": {"projector": "audio", "new_tokens": "audio"},
         "base": {"path": "/runs/base", "hash": "b" * 64},
         "specialists": [{"name": "image", "path": "/runs/image", "alpha": 0.3, "hash": "1" * 64},
                         {"name": "audio", "path": "/runs/audio", "alpha": 0.5, "hash": "2" * 64}]},
        {"step": "recover", "from": "/runs/fused", "global_step": 300, "train_parts": ["projector"], "lora": None},
    ]
    (d / "omni_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def exported(trained_dir, tmp_path_factory):
    from omni_lightning.app.cli import main

    root = tmp_path_factory.mktemp("exported")
    results = root / "results.json"
    results.write_text(json.dumps({"audio": {"q2c_hit1": 0.82, "n": 48}, "image": {"q2c_hit1": 0.9, "n": 48}}))
    out = root / "final-export"
    assert main(["export", "--model", str(trained_dir), "--out", str(out), "--eval-results", str(results)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(trained_dir):
    model, proc = load_model_and_processor(trained_dir)
    model.eval()
    items = demo_items()
    return items, model.encode(proc, items), model.encode(proc, items, INSTR), model, proc


def test_every_model_directory_loads_with_automodel(tiny_model_dir, tiny):
    """save_pretrained writes config.json (model type omni_embedder): a trained folder opens with AutoModel."""
    from transformers import AutoConfig, AutoModel

    model, proc = tiny
    assert AutoConfig.from_pretrained(tiny_model_dir).model_type == "omni_embedder"
    auto = AutoModel.from_pretrained(tiny_model_dir)
    items = demo_items()
    with torch.no_grad():
        got = auto(**proc(items, INSTR)).sentence_embedding
    assert (got - model.encode(proc, items, INSTR)).abs().max() <= TOL
    assert type(auto).__name__ == "OmniEmbedderModel" and not auto.training


def test_automodel_and_autoprocessor_match_encode(exported, reference):
    from transformers import AutoModel, AutoProcessor

    items, ref, ref_q, _, _ = reference
    model = AutoModel.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    assert type(processor).__name__ == "OmniEmbedderProcessor"
    with torch.no_grad():
        got = model(**processor(items=items)).sentence_embedding
        got_q = model(**processor(items=items, instruction=INSTR)).sentence_embedding
        got_text = model(**processor(text=[items[0]["text"]])).sentence_embedding
    assert got.shape == ref.shape == (len(items), model.config.hidden_size)
    assert (got - ref).abs().max() <= TOL and (got_q - ref_q).abs().max() <= TOL
    assert (got_text - ref[:1]).abs().max() <= TOL
    # the exported folder is still an omni-lightning model directory
    again = OmniEmbedder.from_pretrained(exported)
    assert set(again.state_dict()) == set(model.state_dict())


def test_sentence_transformers_encodes_text_images_audio_video(exported, reference):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    items, ref, _, _, _ = reference
    st = SentenceTransformer(str(exported), device="cpu")
    assert set(st.modalities) >= {"text", "image", "audio", "video"}

    def enc(inputs):
        return torch.as_tensor(st.encode(inputs, convert_to_numpy=True))

    text = enc([items[0]["text"]])
    image = enc([Image.fromarray(items[1]["image"]), Image.fromarray(items[2]["image"])])
    image_np = enc([items[1]["image"]])
    video = enc([{"array": items[3]["frames"], "video_metadata": {"fps": 2.0, "total_num_frames": 4}}])
    audio = enc([{"array": items[4]["waveform"], "sampling_rate": 16000}])
    audio_8k = enc([{"array": items[5]["waveform"], "sampling_rate": 8000}])
    assert text.shape == (1, st.get_embedding_dimension())
    for got, want in ((text, ref[0:1]), (image, ref[1:3]), (image_np, ref[1:2]), (video, ref[3:4]),
                      (audio, ref[4:5]), (audio_8k, ref[5:6])):
        assert (got - want).abs().max() <= TOL
    # normalised, cosine similarity as the folder says
    assert st.similarity_fn_name == "cosine"
    np.testing.assert_allclose(text.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_backbone_only_is_a_plain_checkpoint_of_its_architecture(trained_dir, reference, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from omni_lightning.app.cli import main
    from omni_lightning.model import pool

    items, ref, _, omni_model, proc = reference
    out = tmp_path / "backbone"
    assert main(["export", "--model", str(trained_dir), "--out", str(out), "--backbone-only"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLModel"]
    assert not (out / "omni_config.json").exists()
    backbone = AutoModel.from_pretrained(out).eval()
    assert type(backbone).__name__ == "Qwen3VLModel"
    processor = AutoProcessor.from_pretrained(out)
    for k, v in omni_model.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    # a text embedding computed with the plain backbone alone equals the omni model's
    batch = proc([items[0]], None)
    assert processor.tokenizer(batch_text := proc.config.candidate_template.format(content=items[0]["text"]))[
        "input_ids"] == batch["input_ids"][0].tolist(), batch_text
    with torch.no_grad():
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    emb = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"]).float(), dim=-1)
    assert (emb - ref[:1]).abs().max() <= TOL
    card = (out / "README.md").read_text()
    assert "language+vision backbone" in card and "sha256" in card


def test_model_card_has_recipe_hashes_and_eval_table(exported, trained_dir):
    import hashlib

    card = (exported / "README.md").read_text()
    digest = hashlib.sha256((trained_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"`model.safetensors`: sha256 `{digest}`" in card
    assert "1. init-model: preset `tiny`, seed 0" in card
    assert "2. fuse: method `task_arithmetic`, coefficients image 0.3, audio 0.5" in card
    assert "3. recover: from `/runs/fused`, 300 steps, trained ['projector']" in card
    assert f"fusion input audio `/runs/audio`: `{'2' * 64}`" in card
    assert "| audio | 0.820 | 48 |" in card and "| image | 0.900 | 48 |" in card
    assert "library_name: sentence-transformers" in card


def test_export_refuses_to_overwrite(exported, trained_dir):
    from omni_lightning.model.export import export_model

    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(trained_dir, exported)
