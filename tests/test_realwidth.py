"""A real-width smoke run of the whole recipe, plus the cluster-friendly output of training runs.

The smoke run builds, in the test, local checkpoints at real widths with random weights in bf16: a Qwen3-VL-8B
backbone (text hidden 4096, MLP 12288, 32 heads / 8 KV heads of 128, the 151936-row padded vocabulary; vision
1152 wide, patch 16) cut to 2 text layers and 2 vision blocks, and a Qwen3-Omni audio tower at its width (1280,
output 2048) cut to 2 layers. Then: assemble → embed every modality → a 2-step LoRA fit (image specialist) and
a 2-step audio specialist → fuse → a 2-step projector recovery → export → reload with ``AutoModel`` and compare
with ``OmniEmbedder.encode``. It prints its wall time and peak memory (measured on 2 CPU cores: see
docs/training.md).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import demo_items

import omni_lightning.model  # noqa: F401  (registers the omni_embedder model type)

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=2, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})
QWEN3_VL_8B_VISION = dict(depth=2, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                          num_position_embeddings=2304, deepstack_visual_indexes=[0, 1])
QWEN3_OMNI_AUDIO = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        d_model=1280, output_dim=2048, downsample_hidden_size=480, max_source_positions=1500,
                        n_window=50, n_window_infer=800)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def real_width_checkpoints(root: Path) -> tuple[Path, Path]:
    """A Qwen3-VL checkpoint (Qwen3-VL-8B widths, 2 layers, with a chat template) and a stand-alone Qwen3-Omni
    audio encoder (its width, 2 layers), random bf16 weights, as local directories."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLModel,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    from omni_lightning.demo import demo_vocabulary
    from omni_lightning.model.build import train_tiny_tokenizer

    tok = train_tiny_tokenizer(list(demo_vocabulary()), 1000)  # ids < 1000 inside the 151936 padded rows
    v = QWEN3_VL_8B_VISION
    size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size)
    video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                  do_sample_frames=False, cap_pixels_per_frame=True)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                 chat_template=CHAT_TEMPLATE)
    cfg = Qwen3VLConfig(text_config=dict(QWEN3_VL_8B_TEXT), vision_config=dict(v),
                        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():  # random values drawn below in float32 chunks (bf16 init kernels are slow on CPU)
            vlm = Qwen3VLModel(cfg)
            audio = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**QWEN3_OMNI_AUDIO))
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(0)
    for module in (vlm, audio):
        for name, p in module.named_parameters():
            flat = p.data.view(-1)
            for i in range(0, flat.numel(), 1 << 24):
                n = min(1 << 24, flat.numel() - i)
                if name.endswith("bias"):
                    flat[i:i + n] = 0
                elif "norm" in name or name.endswith("ln_post.weight"):
                    flat[i:i + n] = 1
                else:
                    flat[i:i + n] = torch.randn(n, generator=g) * (0.02 if p.dim() < 2 else p.shape[-1] ** -0.5)
    vlm_dir = root / "qwen3-vl-8b-2l"
    vlm.save_pretrained(vlm_dir)
    del vlm
    processor.save_pretrained(vlm_dir)
    audio_dir = root / "qwen3-omni-audio-2l"
    audio.save_pretrained(audio_dir)
    del audio
    (audio_dir / "preprocessor_config.json").write_text(json.dumps(
        {"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 30}))
    return vlm_dir, audio_dir


def fit_config(src: str, out: Path, callbacks: list[dict], **data) -> Path:
    """A shipped fit config with the real-width run's callbacks and data sizes."""
    cfg = yaml.safe_load((REPO / "configs" / src).read_text())
    cfg["trainer"]["callbacks"] = callbacks
    cfg["data"]["init_args"].update(data)
    out.write_text(yaml.safe_dump(cfg))
    return out


def _fit(config: Path, model: Path, export: Path, data_root: Path, work: Path) -> None:
    from omni_lightning.app.fit import lightning_cli

    lightning_cli(["fit", "--config", str(config), "--model.init_args.model", str(model),
                   "--model.init_args.export_dir", str(export), "--data.init_args.data_root", str(data_root),
                   "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--trainer.precision", "bf16-true",
                   "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(work / "lightning")])


@pytest.mark.skipif(os.environ.get("OMNI_REALWIDTH") != "1",
                    reason="the real-width run takes well over the suite's budget on 2 CPU cores (bf16 matmuls are "
                    "~4x slower than float32 without AVX512-BF16); run it with OMNI_REALWIDTH=1")
@pytest.mark.timeout(3600)
def test_real_width_recipe_end_to_end(tmp_path, demo_root, capsys):
    from transformers import AutoModel

    from omni_lightning.fusion import FuseConfig, fuse
    from omni_lightning.model import OmniConfig, OmniEmbedder, OmniProcessor
    from omni_lightning.model.export import export_model

    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - t0 - sum(times.values()), 1)
        with capsys.disabled():
            print(f"\n  {name}: {times[name]} s (peak RSS {_peak_rss_gb():.2f} GB)", flush=True)

    vlm_dir, audio_dir = real_width_checkpoints(tmp_path / "ckpt")
    lap("checkpoints")
    from omni_lightning.model.build import init_model

    base = init_model(tmp_path / "base", backbone=str(vlm_dir), audio_encoder=str(audio_dir), dtype="bfloat16")
    shutil.rmtree(tmp_path / "ckpt")
    cfg = OmniConfig.load(base)
    assert cfg.prompt_format == "chat" and cfg.backbone["text_config"]["hidden_size"] == 4096
    assert cfg.backbone["text_config"]["vocab_size"] == 151936 and max(cfg.audio_token_ids.values()) < 151936
    lap("assemble")

    model = OmniEmbedder.from_pretrained(base).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    proc = OmniProcessor.from_pretrained(base, model.config)
    items = [it for i, it in enumerate(demo_items()) if i != 5]  # one item per modality (+ a page)
    emb = model.encode(proc, items, "Find it.")
    assert emb.shape == (len(items), 4096) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(items)), atol=1e-3, rtol=0)
    del model
    lap("embed every modality")

    progress = [{"class_path": "omni_lightning.callbacks.ProgressLog", "init_args": {"every_n_steps": 1}}]
    sizes = dict(batch_size=2, steps_per_epoch=2, val_batches=0, num_workers=0)
    image_cfg = fit_config("specialist/image.yaml", tmp_path / "image.yaml", progress, **sizes)
    _fit(image_cfg, base, tmp_path / "image", demo_root, tmp_path)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out, flush=True)
    assert "[specialist] step 1/2" in out and "[specialist] step 2/2 (100%) | loss " in out and "ETA" in out
    lap("2-step LoRA fit (image specialist)")
    audio_cfg = fit_config("specialist/audio.yaml", tmp_path / "audio.yaml", progress, **sizes)
    _fit(audio_cfg, base, tmp_path / "audio", demo_root, tmp_path)
    lap("2-step audio specialist")

    fused = fuse(FuseConfig(base=str(base), specialists=[str(tmp_path / "image"), str(tmp_path / "audio")],
                            names=["image", "audio"], alpha=[0.3, 0.5], out=str(tmp_path / "fused"),
                            progress=False, fsync=False)).out
    for d in ("image", "audio"):
        shutil.rmtree(tmp_path / d)
    lap("fuse")

    recover = [*progress, {"class_path": "omni_lightning.callbacks.FreezeBackbone",
                           "init_args": {"frozen": ["backbone", "audio_encoder"], "trainable": ["projector"]}}]
    rec_cfg = fit_config("recover.yaml", tmp_path / "recover.yaml", recover, **sizes)
    _fit(rec_cfg, Path(fused), tmp_path / "recovered", demo_root, tmp_path)
    assert "[recover] step 2/2" in capsys.readouterr().out
    shutil.rmtree(base)
    lap("2-step recovery")

    folder = export_model(tmp_path / "recovered", tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "fuse: method `task_arithmetic`" in card and "recover:" in card
    lap("export")

    model = OmniEmbedder.from_pretrained(folder).eval()
    proc = OmniProcessor.from_pretrained(folder, model.config)
    ref = model.encode(proc, items, "Find it.")
    del model
    auto = AutoModel.from_pretrained(folder)
    assert next(auto.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = auto(**proc(items, "Find it.")).sentence_embedding
    assert (got - ref).abs().max() <= 1e-5
    lap("reload with AutoModel")
    total = round(time.perf_counter() - t0, 1)
    with capsys.disabled():
        print(f"\nreal-width recipe: {total} s, peak RSS {_peak_rss_gb():.2f} GB; {times}")


# ---------------------------------------------------------------------------------------------- cluster output
def _tiny_fit_args(tiny_model_dir, demo_root, tmp_path, logger: dict | str = "false", extra=()) -> list[str]:
    from conftest import fit_args

    args = fit_args(REPO / "configs" / "recover.yaml", tiny_model_dir, demo_root, tmp_path / "rec",
                    ["--trainer.limit_val_batches", "0", *extra])
    i = args.index("--trainer.logger")
    args[i + 1] = logger if isinstance(logger, str) else json.dumps(logger)
    return args


def test_progress_lines_without_a_progress_bar(tiny_model_dir, demo_root, tmp_path, capsys):
    """recover.yaml ships ProgressLog: without a bar, a line of step / loss / samples/s / ETA every N steps."""
    from omni_lightning.app.fit import lightning_cli

    cli = lightning_cli(_tiny_fit_args(tiny_model_dir, demo_root, tmp_path, extra=[
        "--trainer.callbacks+=omni_lightning.callbacks.ProgressLog", "--trainer.callbacks.every_n_steps=2"]))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[recover] step")]
    # the shipped ProgressLog (every 50 steps: only the last step of 3) and the added one (every 2: steps 2, 3)
    assert [ln.split(" | ")[0] for ln in lines] == ["[recover] step 2/3 (67%)", "[recover] step 3/3 (100%)",
                                                     "[recover] step 3/3 (100%)"], lines
    assert all(" | loss " in ln and " samples/s | elapsed " in ln for ln in lines)
    assert " | ETA " in lines[0]
    logs = [c for c in cli.trainer.callbacks if type(c).__name__ == "ProgressLog"]
    assert len(logs) == 2


def test_progress_log_is_silent_under_a_progress_bar(tiny_model_dir, demo_root, tmp_path, capsys):
    from omni_lightning.app.fit import lightning_cli

    args = _tiny_fit_args(tiny_model_dir, demo_root, tmp_path)
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    lightning_cli(args)
    assert "[recover] step" not in capsys.readouterr().out


def test_each_phase_writes_its_own_config_and_wandb_holds_all_of_it(tiny_model_dir, demo_root, tmp_path, monkeypatch):
    """Two runs logging to one W&B save_dir write two config files; the run's W&B config is the resolved config."""
    from omni_lightning.app.fit import lightning_cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    paths, configs = [], []
    for name in ("recover-a", "recover-b"):
        logger = {"class_path": "omni_lightning.loggers.OmniWandbLogger",
                  "init_args": {"name": name, "save_dir": str(tmp_path / "logs"), "job_type": "recover"}}
        cli = lightning_cli(_tiny_fit_args(tiny_model_dir, demo_root, tmp_path, logger,
                                           extra=["--model.init_args.export_overwrite", "true"]))
        cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OmniSaveConfig")
        paths.append(Path(cb.config_path))
        configs.append(yaml.safe_load(paths[-1].read_text()))
    assert paths == [tmp_path / "logs" / "recover-a" / "config.yaml", tmp_path / "logs" / "recover-b" / "config.yaml"]
    assert configs[0]["trainer"]["logger"]["init_args"]["name"] == "recover-a"
    # the offline runs' config holds model, data and trainer (read back from the run files)
    from omni_lightning.tracking.offline import offline_runs

    runs = offline_runs(tmp_path / "logs", wait=30)
    assert len(runs) == 2, [r.path for r in runs]
    for run, name in zip(sorted(runs, key=lambda r: r.config["trainer"]["logger"]["init_args"]["name"]),
                         ("recover-a", "recover-b")):
        stored = run.config
        assert stored["trainer"]["logger"]["init_args"]["name"] == name
        assert stored["model"]["init_args"]["model"] == str(tiny_model_dir)
        assert stored["model"]["class_path"] == "omni_lightning.modules.RecoveryModule"
        assert stored["data"]["init_args"]["batch_size"] == 8
        assert stored["trainer"]["max_epochs"] == 1 and stored["seed_everything"] == 0


def test_missing_fit_input_is_one_line(tmp_path, demo_root, tiny_model_dir):
    import subprocess
    import sys

    py = [sys.executable, "-m", "omni_lightning"]
    r = subprocess.run([*py, "fit", "--config", str(REPO / "configs" / "recover.yaml"), "--model.init_args.model",
                        str(tmp_path / "nope"), "--data.init_args.data_root", str(demo_root)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert err == [f"omni-lightning fit: error: model.init_args.model: model directory '{tmp_path / 'nope'}' "
                   "does not exist"], r.stderr
    r = subprocess.run([*py, "fit", "--config", str(REPO / "configs" / "recover.yaml"),
                        f"--model.init_args.model={tiny_model_dir}"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "omni-lightning fit: error: data.init_args.data_root: dataset root 'runs/demo/data' does not exist "
        f"(from {REPO / 'configs' / 'recover.yaml'})")


def test_dashboard_online_without_api_key_is_one_line(tmp_path, monkeypatch, capsys):
    from omni_lightning.app.cli import main

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert main(["dashboard", "--entity", "e", "--project", "p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a W&B API key" in err[0] and "--dry_run" in err[0], err


def test_progress_log_format_and_copy():
    from omni_lightning.callbacks import ProgressLog
    from omni_lightning.callbacks.progress_log import format_duration

    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m05s"]
    with pytest.raises(ValueError):
        ProgressLog(every_n_steps=0)
    assert copy.deepcopy(ProgressLog(3)).every_n_steps == 3
