"""Projector-recovery step time vs an audio-specialist step, same model and same batch, side by side.

    .venv/bin/python benchmarks/recovery_step.py [--preset small|tiny] [--batch-size 32] [--steps 8]

* specialist step: configs/specialist/audio.yaml's setting — LoRA on the LLM and the audio encoder, the
  projector in full; the graph spans the whole model;
* recovery step: configs/recover.yaml's setting — only the projector trains; the backbone and the audio
  encoder are frozen (FreezeBackbone), so the text side and the audio encoder run without autograd and no
  backbone weight gradient is computed.

Both do forward, backward and an AdamW step on the same audio–text batch; steps alternate between the two
so machine load hits both alike; the median step time of each is reported. Target: recovery ≤ 0.6×.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a fresh embedded preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import lightning.pytorch as pl

    from omni_lightning.callbacks import FreezeBackbone
    from omni_lightning.data.datamodule import Collator
    from omni_lightning.demo import make_demo_data
    from omni_lightning.data.shards import iter_samples, split_dir
    from omni_lightning.modules import LoraSettings, LossSettings, RecoveryModule, SpecialistModule

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model
    if model_dir is None:
        from omni_lightning.demo import init_demo_model

        model_dir = str(init_demo_model(Path(tmp.name) / args.preset, preset=args.preset))
    data = Path(tmp.name) / "data"
    make_demo_data(data, modalities=["audio"], n_train=args.batch_size, n_eval=args.batch_size)
    samples = [s for _, s in zip(range(args.batch_size), iter_samples(str(split_dir(data, "audio", "train"))))]
    batch = Collator(model_dir, None, 0)(samples, "audio")

    pl.seed_everything(0, verbose=False)
    loss = LossSettings(temperature=0.05)
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-4)  # noqa: E731
    specialist = SpecialistModule(modality="audio", model=model_dir, train_parts=["projector"],
                                  lora=LoraSettings(parts=["language_model", "audio_encoder"], r=32),
                                  loss=loss, optimizer=adamw)
    recovery = RecoveryModule(model=model_dir, loss=loss, optimizer=adamw)
    FreezeBackbone().freeze_before_training(recovery)
    modules = {"specialist": specialist, "recovery": recovery}
    optimizers = {k: m.configure_optimizers() for k, m in modules.items()}

    def step(name: str) -> float:
        module, opt = modules[name], optimizers[name]
        t = time.perf_counter()
        sides, loss_fn = module._loss_on(batch)
        loss_fn(*[module.encode_chunks(s) for s in sides]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name in modules:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.steps):
        for name in modules:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:10s} step {v * 1000:8.1f} ms (median of {args.steps}, batch {args.batch_size}, preset {args.preset})")
    print(f"recovery / specialist step time: {med['recovery'] / med['specialist']:.2f}x (target <= 0.6x)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
