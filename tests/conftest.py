"""Shared fixtures: one tiny model directory and one small demo corpus per test session (no network)."""

from __future__ import annotations

import os
import tarfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from omni_lightning.demo import init_demo_model

    return init_demo_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from omni_lightning.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo-data")
    make_demo_data(root, seed=0, n_train=96, n_eval=48, max_per_shard=48)
    return root


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) loaded once; tests must not modify the model's weights."""
    from omni_lightning.model import load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir)
    return model.eval(), processor


def demo_items():
    """One item of every type, built in memory."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        {"type": "text", "text": "a red digit seven"},
        {"type": "image", "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)},
        {"type": "document", "image": rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)},
        {"type": "video", "frames": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)},
        {"type": "audio", "waveform": rng.standard_normal(16000).astype("float32"), "sample_rate": 16000},
        {"type": "audio", "waveform": rng.standard_normal(4000).astype("float32"), "sample_rate": 8000},
    ]


def fit_args(config, model_dir, data_root, out, extra=()) -> list[str]:
    """`omni-lightning fit` arguments for a shipped config, cut down to a few CPU steps without a logger."""
    from pathlib import Path

    return [
        "fit", "--config", str(config),
        "--model.init_args.model", str(model_dir),
        "--model.init_args.export_dir", str(out),
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.batch_size", "8",
        "--data.init_args.steps_per_epoch", "3",
        "--data.init_args.val_batches", "1",
        "--data.init_args.num_workers", "0",
        "--trainer.max_epochs", "1",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(Path(out).parent / "lightning"),
        *extra,
    ]


def assert_lora_export_equals_wrapped(module, model_dir, out_dir) -> None:
    """Random non-zero adapters; the merged dense export must embed like the LoRA-wrapped model."""
    import torch

    from omni_lightning.model import OmniEmbedder
    from omni_lightning.model.processor import OmniProcessor

    torch.manual_seed(0)
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # non-zero adapters (lora_B starts at zero)
    module.eval()
    batch = OmniProcessor.from_pretrained(model_dir)(demo_items(), "x")
    with torch.no_grad():
        wrapped = module.model(batch)
        plain = OmniEmbedder.from_pretrained(model_dir).eval()(batch)
    assert (wrapped - plain).abs().max() > 1e-3  # the adapters matter
    out = module.export(out_dir)
    with torch.no_grad():
        merged = OmniEmbedder.from_pretrained(out).eval()(batch)
    torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=1e-4)


def corrupt_member(tar_path: Path, member: str) -> None:
    """Overwrite one tar member's bytes in place (the shard stays a valid tar; the member fails to decode)."""
    with tarfile.open(tar_path) as tf:
        ti = tf.getmember(member)
        offset, size = ti.offset_data, ti.size
    with open(tar_path, "r+b") as f:
        f.seek(offset)
        f.write(bytes((b * 7 + 13) % 256 for b in range(size)))
