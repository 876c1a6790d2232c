"""Specialist training steps/s under the Lightning Trainer vs a bare PyTorch loop, same model and batches.

    .venv/bin/python benchmarks/lightning_overhead.py [--model DIR] [--steps 30] [--modality image]

Both runs start from the same weights (the tiny default, LoRA on the backbone as in
configs/specialist/image.yaml), use the same AdamW and consume the same pre-collated batches of the demo
corpus from memory, so the difference is the Trainer's own per-step work (hooks, logging, loops).
The first ``--warmup`` steps are not timed. Steps/s are computed from the process's CPU time
(``time.process_time``), which other jobs on a shared machine do not inflate; wall-clock figures are printed
beside them. Target: Trainer ≥ 0.95× the bare loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build(model_dir: str, modality: str):
    import lightning.pytorch as pl

    from omni_lightning.modules import LoraSettings, LossSettings, SpecialistModule

    pl.seed_everything(0, verbose=False)
    return SpecialistModule(
        modality=modality, model=model_dir, lora=LoraSettings(parts=["backbone"], r=32),
        loss=LossSettings(temperature=0.05), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--data", help="demo data root (default: generated in a temporary folder)")
    ap.add_argument("--modality", default="image")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import lightning.pytorch as pl

    from omni_lightning.data.datamodule import Collator
    from omni_lightning.data.shards import iter_samples, split_dir

    tmp = tempfile.TemporaryDirectory()
    model_dir, data = args.model, args.data
    if model_dir is None:
        from omni_lightning.demo import init_demo_model

        model_dir = str(init_demo_model(Path(tmp.name) / "tiny"))
    if data is None:
        from omni_lightning.demo import make_demo_data

        data = str(Path(tmp.name) / "data")
        make_demo_data(data, modalities=[args.modality], n_train=args.batch_size * 4, n_eval=args.batch_size)
    stream = iter(iter_samples(str(split_dir(data, args.modality, "train")), resampled=True))
    collate = Collator(model_dir, None, 0)
    n = args.steps + args.warmup
    batches = [collate([next(stream) for _ in range(args.batch_size)], args.modality) for _ in range(n)]

    def bare_loop() -> float:
        module = build(model_dir, args.modality)
        opt = module.configure_optimizers()
        module.train()
        for i, batch in enumerate(batches):
            if i == args.warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            sides, loss_fn = module._loss_on(batch)
            loss = loss_fn(*[module.encode_chunks(s) for s in sides])
            loss.backward()
            opt.step()
            opt.zero_grad()
        return args.steps / (time.process_time() - c0), args.steps / (time.perf_counter() - t0)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, trainer, pl_module):
            self.t1, self.c1 = time.perf_counter(), time.process_time()

    def lightning_loop() -> float:
        module = build(model_dir, args.modality)
        clock = Clock()
        trainer = pl.Trainer(max_steps=n, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
                             accelerator="cpu", devices=1)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
        trainer.fit(module, train_dataloaders=loader)
        return args.steps / (clock.c1 - clock.c0), args.steps / (clock.t1 - clock.t0)

    # interleaved rounds, so a change in machine load hits both sides alike; the median ratio is reported
    ratios = []
    for r in range(args.rounds):
        (bare, bare_wall), (lit, lit_wall) = bare_loop(), lightning_loop()
        ratios.append(lit / bare)
        print(f"round {r}: per CPU-second: bare loop {bare:.2f} steps, Trainer {lit:.2f} steps, ratio {lit / bare:.3f}"
              f"  (wall clock: {bare_wall:.2f} vs {lit_wall:.2f} steps/s)", flush=True)
    ratios.sort()
    print(f"median ratio Trainer / bare loop: {ratios[len(ratios) // 2]:.3f} (target >= 0.95)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
