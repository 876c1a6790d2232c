"""OmniEmbedder: forward per modality, audio splicing, pooling, save/load, model directories, assembly."""

from __future__ import annotations

import os
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import demo_items

from omni_lightning.model import OmniConfig, OmniEmbedder, OmniProcessor, pool
from omni_lightning.model.audio import audio_token_count, encode_audio


def test_forward_every_modality_unit_norm(tiny):
    model, proc = tiny
    items = demo_items()
    batch = proc(items, "Find the matching item.")
    with torch.no_grad():
        emb = model(batch)
    assert emb.shape == (len(items), model.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(items)))
    # no two different inputs collapse onto one embedding
    sims = emb @ emb.T
    assert (sims - torch.eye(len(items))).max() < 0.9999


def test_batched_equals_one_by_one(tiny):
    """Padding, packing of audio, and image/video pixel batching do not leak across rows."""
    model, proc = tiny
    items = demo_items()
    with torch.no_grad():
        together = model(proc(items, "instr"))
        alone = torch.cat([model(proc([it], "instr")) for it in items])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)


def test_audio_placeholders_are_replaced_by_projected_features(tiny):
    model, proc = tiny
    items = [demo_items()[0], demo_items()[4], demo_items()[5]]
    batch = proc(items, None)
    pad = model.config.audio_token_ids["<|audio_pad|>"]
    n_tokens = [audio_token_count(model.config, int(n)) for n in batch["audio_feature_lens"]]
    assert (batch["input_ids"] == pad).sum(1).tolist() == [0, *n_tokens]

    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.backbone.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    embeds = seen["embeds"]
    with torch.no_grad():
        expected_audio = model.projector(
            encode_audio(model.audio_encoder, model.config, batch["audio_features"], batch["audio_feature_lens"])
        )
        token_rows = model.backbone.get_input_embeddings()(batch["input_ids"])
    mask = batch["input_ids"] == pad
    torch.testing.assert_close(embeds[mask], expected_audio)
    torch.testing.assert_close(embeds[~mask], token_rows[~mask])
    # and the placeholder's own embedding is gone
    assert not torch.allclose(embeds[mask][0], token_rows[mask][0])


def test_audio_content_changes_the_embedding(tiny):
    model, proc = tiny
    a, b = demo_items()[4], dict(demo_items()[4], waveform=np.zeros(16000, dtype="float32"))
    with torch.no_grad():
        ea, eb = model(proc([a, b], None))
    # the tiny tower is initialised to pass its input through (model/build.py): a clip and silence must embed
    # clearly apart (cos ≈ 0.73 here); a collapsed tower or a broken splice gives cos ≈ 1
    assert float(ea @ eb) < 0.99


def test_audio_mismatch_is_a_clear_error(tiny):
    model, proc = tiny
    batch = proc([demo_items()[4]], None)
    batch = {k: v for k, v in batch.items() if not k.startswith("audio_")}
    with pytest.raises(ValueError, match="audio_pad"):
        model(batch)


def test_pooling_last_and_mean_against_loops():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    for mask in (right, left):
        last = torch.stack([h[i, int(torch.nonzero(mask[i])[-1])] for i in range(3)])
        mean = torch.stack([h[i][mask[i].bool()].mean(0) for i in range(3)])
        torch.testing.assert_close(pool(h, mask, "last"), last)
        torch.testing.assert_close(pool(h, mask, "mean"), mean)


def test_save_load_bit_exact_and_sharded(tiny, tmp_path):
    model, proc = tiny
    d = model.save_pretrained(tmp_path / "single", processor=proc.processor)
    d2 = model.save_pretrained(tmp_path / "sharded", processor=proc.processor, max_shard_size=200_000)
    assert (d / "model.safetensors").is_file()
    index = json.loads((d2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref = model.state_dict()
    for directory in (d, d2):
        loaded = OmniEmbedder.from_pretrained(directory).state_dict()
        assert loaded.keys() == ref.keys()
        for k in ref:
            assert loaded[k].dtype == ref[k].dtype and torch.equal(loaded[k], ref[k]), k
    # the loaded processor builds identical inputs
    p2 = OmniProcessor.from_pretrained(d2)
    b1, b2 = proc(demo_items(), "x"), p2(demo_items(), "x")
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)


def test_model_dir_describes_parts(tiny_model_dir):
    cfg = OmniConfig.load(tiny_model_dir)
    model = OmniEmbedder.from_pretrained(tiny_model_dir)
    names = list(model.state_dict())
    owned = {part: [n for n in names if n.startswith(prefix)] for part, prefix in cfg.parts.items()}
    assert all(owned.values()), owned.keys()
    assert sum(len(v) for v in owned.values()) == len(names)  # every tensor belongs to exactly one part
    emb = model.backbone.get_input_embeddings().weight
    assert cfg.base_vocab_size < emb.shape[0] == max(cfg.audio_token_ids.values()) + 1


def test_tiny_preset_is_deterministic(tmp_path):
    from omni_lightning.demo import init_demo_model

    a = init_demo_model(tmp_path / "a", seed=0)
    b = init_demo_model(tmp_path / "b", seed=0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="hub id"):
        OmniEmbedder.from_pretrained("Qwen/Qwen3-VL-8B-Instruct")
    with pytest.raises(FileNotFoundError, match="omni-lightning model directory"):
        OmniEmbedder.from_pretrained(tmp_path)
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "omni_config.json").write_text((tiny_model_dir / "omni_config.json").read_text())
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        OmniEmbedder.from_pretrained(bad)


def test_cli_init_model_errors(tmp_path):
    cmd = [sys.executable, "-m", "omni_lightning", "init-model", "--out", str(tmp_path / "m"),
           "--backbone", "Qwen/Qwen3-VL-2B-Instruct", "--audio-encoder", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "looks like a hub id" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def _tiny_hf_checkpoints(tmp_path):
    """A Qwen3-VL conditional-generation checkpoint and a Whisper checkpoint, as the hub lays them out."""
    from transformers import (
        Qwen3VLForConditionalGeneration,
        WhisperConfig,
        WhisperModel,
    )

    from omni_lightning.model.build import build_preset

    model, processor = build_preset("tiny", 1, ["a red digit seven", "three beeps"])
    cfg = model.backbone.config
    cfg.text_config.vocab_size = model.config.base_vocab_size
    torch.manual_seed(0)
    vlm = Qwen3VLForConditionalGeneration(cfg)
    vlm_dir = tmp_path / "qwen3vl"
    vlm.save_pretrained(vlm_dir)
    # the hub tokenizer has no audio tokens yet: rebuild one without them
    from transformers import Qwen3VLProcessor

    from omni_lightning.model.build import train_tiny_tokenizer

    tok = train_tiny_tokenizer(["a red digit seven", "three beeps"], 300)
    Qwen3VLProcessor(image_processor=processor.image_processor, tokenizer=tok,
                     video_processor=processor.video_processor).save_pretrained(vlm_dir)
    wcfg = WhisperConfig(num_mel_bins=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                         d_model=32, max_source_positions=100, decoder_layers=1, decoder_attention_heads=2,
                         decoder_ffn_dim=32, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1)
    whisper = WhisperModel(wcfg)
    w_dir = tmp_path / "whisper"
    whisper.save_pretrained(w_dir)
    (w_dir / "preprocessor_config.json").write_text(json.dumps(
        {"feature_size": 32, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 2}))
    return vlm, vlm_dir, whisper, w_dir


def test_assemble_real_layout_checkpoints(tmp_path):
    """init-model --backbone/--audio-encoder: weights taken from the local checkpoints, encodes every modality."""
    from omni_lightning.model.build import init_model

    vlm, vlm_dir, whisper, w_dir = _tiny_hf_checkpoints(tmp_path)
    out = init_model(tmp_path / "omni", backbone=str(vlm_dir), audio_encoder=str(w_dir))
    model = OmniEmbedder.from_pretrained(out).eval()
    cfg = OmniConfig.load(out)
    assert cfg.audio_type == "whisper" and cfg.backbone_type == "qwen3_vl"
    assert set(cfg.audio_token_ids) == {"<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"}
    # backbone and encoder weights are the checkpoints' own
    torch.testing.assert_close(model.backbone.language_model.layers[0].mlp.up_proj.weight,
                               vlm.model.language_model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(model.backbone.visual.blocks[0].attn.qkv.weight, vlm.model.visual.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.audio_encoder.layers[0].fc1.weight, whisper.encoder.layers[0].fc1.weight)
    proc = OmniProcessor.from_pretrained(out)
    with torch.no_grad():
        emb = model(proc(demo_items(), "x"))
    assert emb.shape[0] == len(demo_items()) and torch.isfinite(emb).all()


def test_assemble_rejects_unsupported(tmp_path):
    from omni_lightning.model.build import init_model

    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported backbone"):
        init_model(tmp_path / "o", backbone=str(d), audio_encoder=str(d))
    with pytest.raises(FileNotFoundError):
        init_model(tmp_path / "o", backbone=str(tmp_path / "missing"), audio_encoder=str(d))


def test_assemble_from_a_qwen3_omni_checkpoint(tmp_path):
    """The default audio tower comes out of a full Qwen3-Omni checkpoint: only thinker.audio_tower.* is read."""
    from safetensors.torch import save_file
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig,
    )
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoder,
    )

    from omni_lightning.model.build import TINY, init_model

    _, vlm_dir, _, _ = _tiny_hf_checkpoints(tmp_path)
    torch.manual_seed(3)
    tower = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**TINY["audio"]))
    omni_dir = tmp_path / "qwen3omni"
    omni_dir.mkdir()
    state = {f"thinker.audio_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["thinker.model.embed_tokens.weight"] = torch.zeros(4, 4)  # other thinker tensors are ignored
    half = len(state) // 2
    names = sorted(state)
    save_file({k: state[k] for k in names[:half]}, str(omni_dir / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(omni_dir / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (omni_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (omni_dir / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_omni_moe", "thinker_config": {"audio_config": dict(TINY["audio"])}}))
    (omni_dir / "preprocessor_config.json").write_text(json.dumps(
        {"feature_size": 32, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 2}))
    out = init_model(tmp_path / "omni", backbone=str(vlm_dir), audio_encoder=str(omni_dir))
    model = OmniEmbedder.from_pretrained(out)
    assert model.config.audio_type == "qwen3_omni_moe_audio_encoder"
    for k, v in tower.state_dict().items():
        assert torch.equal(model.audio_encoder.state_dict()[k], v), k
    with torch.no_grad():
        emb = model.eval()(OmniProcessor.from_pretrained(out)(demo_items()[4:], None))
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_family_backbones(kind, tmp_path):
    """Qwen2-VL and Qwen2.5-VL backbones assemble and encode every modality."""
    import transformers

    from omni_lightning.model.build import TINY, init_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer(["a red digit seven", "three beeps"], 300)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [4, 6, 6]})
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cls, cfg_cls, proc_cls = (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig,
                                  transformers.Qwen2VLProcessor)
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0])
        cls, cfg_cls, proc_cls = (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig,
                                  transformers.Qwen2_5_VLProcessor)
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"])
    vlm_dir = tmp_path / kind
    cls(config).save_pretrained(vlm_dir)
    lo, hi = TINY["image_pixels"]
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                         size={"shortest_edge": lo, "longest_edge": hi})
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                         size={"shortest_edge": lo, "longest_edge": hi * 8},
                                                         do_sample_frames=False)
    proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor).save_pretrained(vlm_dir)
    _, _, _, w_dir = _tiny_hf_checkpoints(tmp_path)
    out = init_model(tmp_path / "omni", backbone=str(vlm_dir), audio_encoder=str(w_dir))
    model, proc = OmniEmbedder.from_pretrained(out).eval(), OmniProcessor.from_pretrained(out)
    assert model.config.backbone_type == kind
    with torch.no_grad():
        together = model(proc(demo_items(), "x"))
        alone = torch.cat([model(proc([it], "x")) for it in demo_items()])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)


# the core of Qwen's chat template (string contents; the real one adds tool and list-content branches)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_chat_prompt_format_renders_the_backbone_template(tiny, tmp_path):
    """prompt_format chat: system = instruction (candidates: default_instruction), user = content, then the
    assistant prompt; the embedding is the last token's (the generation prompt's) hidden state."""
    import copy

    from omni_lightning.model.prompts import render_prompt

    model, proc = tiny
    cfg = copy.deepcopy(model.config)
    cfg.prompt_format = "chat"
    backbone_proc = copy.deepcopy(proc.processor)
    backbone_proc.chat_template = QWEN_CHAT_TEMPLATE
    chat = OmniProcessor(cfg, backbone_proc)
    q = render_prompt(cfg, backbone_proc, "a red digit seven", "Find the image.")
    assert q == ("<|im_start|>system\nFind the image.<|im_end|>\n<|im_start|>user\na red digit seven<|im_end|>\n"
                 "<|im_start|>assistant\n")
    c = render_prompt(cfg, backbone_proc, "x", None)
    assert c.startswith(f"<|im_start|>system\n{cfg.default_instruction}<|im_end|>")
    items = demo_items()
    batch = chat(items, "Find the image.")
    text = chat.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text == q
    # every modality still embeds, and the format changes the embedding
    model.eval()
    with torch.no_grad():
        e_chat = model(batch)
        e_tmpl = model(proc(items, "Find the image."))
    assert e_chat.shape == e_tmpl.shape and torch.isfinite(e_chat).all()
    assert (e_chat - e_tmpl).abs().max() > 1e-3
    # the tiny preset keeps its own templates
    assert model.config.prompt_format == "template"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(cfg, proc.processor, "x", None)  # no chat template in the tiny preset's processor
    with pytest.raises(ValueError, match="prompt_format"):
        OmniConfig(prompt_format="jinja")


def test_assemble_uses_the_checkpoint_chat_template(tmp_path):
    """A real checkpoint with a chat template gets prompt_format chat (and keeps the template); without one,
    the plain templates."""
    from transformers import Qwen3VLProcessor

    from omni_lightning.model.build import init_model

    vlm, vlm_dir, whisper, w_dir = _tiny_hf_checkpoints(tmp_path)
    out = init_model(tmp_path / "plain", backbone=str(vlm_dir), audio_encoder=str(w_dir))
    assert OmniConfig.load(out).prompt_format == "template"
    p = Qwen3VLProcessor.from_pretrained(vlm_dir)
    p.chat_template = QWEN_CHAT_TEMPLATE
    p.save_pretrained(vlm_dir)
    out = init_model(tmp_path / "chat", backbone=str(vlm_dir), audio_encoder=str(w_dir))
    assert OmniConfig.load(out).prompt_format == "chat"
    proc = OmniProcessor.from_pretrained(out)
    batch = proc([{"type": "text", "text": "three beeps"}], "Find the sound.")
    assert proc.tokenizer.decode(batch["input_ids"][0]).startswith("<|im_start|>system\nFind the sound.<|im_end|>")
    out = init_model(tmp_path / "forced", backbone=str(vlm_dir), audio_encoder=str(w_dir), prompt_format="template")
    assert OmniConfig.load(out).prompt_format == "template"


def test_saving_a_model_folder_sweeps_a_killed_save_and_follows_the_umask(tiny, tmp_path):
    """A killed save leaves `.<name>.tmp-*` beside the folder: the next save removes it; the folder is not 0700."""
    model, processor = tiny
    out = tmp_path / "m"
    stale = tmp_path / ".m.tmp-dead01"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        model.save_pretrained(out, processor=processor)
    finally:
        os.umask(old)
    assert not stale.exists() and (out / "model.safetensors").is_file()
    assert out.stat().st_mode & 0o777 == 0o755
