"""The base LightningModule every phase stands on: it owns the model, the contrastive core and the loop.

Phases differ only in which parts train and how (full, LoRA, frozen) and what they record when they export;
they subclass :class:`OmniModule` and stay thin.

Batches (built by :mod:`omni_lightning.data.datamodule`) hold one modality each::

    {"modality": str, "size": B, "labels": [str|None] * B, "keys": [str] * B, "num_negatives": K,
     "query": [chunk inputs...], "pos": [chunk inputs...], "neg": [chunk inputs...] or None,
     "skipped": int, "mix": {modality: share of trained samples so far}  # mix: several modalities only}

Each side is a list of model-input chunks (one chunk unless GradCache is on); ``neg`` holds ``B*K`` items in
query order. In mixed-batch mode (``data.init_args.mixed_batches``) a batch is ``{"modality": "mixed",
"size": B, "parts": [one such batch per modality], ...}``: each part is encoded and scored on its own (in-batch
and cross-device negatives stay within a modality; part sizes are equal on every rank by construction) and the
step's loss is the size-weighted mean of the parts' losses.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.retrieval import RetrievalHitRate

from omni_lightning.losses import ContrastiveLoss, grad_cache_step
from omni_lightning.modalities import MODALITIES
from omni_lightning.model.config import PART_PREFIXES, expand_parts
from omni_lightning.model.omni import OmniEmbedder
from omni_lightning.model.processor import OmniProcessor
from omni_lightning.tracking import catalogue
from omni_lightning.utils import check_output_apart


@dataclass
class LossSettings:
    """The contrastive core's options (see :class:`omni_lightning.losses.ContrastiveLoss`)."""

    temperature: float = 0.02  # paper: 0.02
    learnable_temperature: bool = False
    symmetric: bool = True  # query→target and target→query averaged (paper, for symmetric pairs)
    cross_device: bool = True  # all-gather negatives across ranks
    false_negative_margin: float | None = None  # mask candidates scoring above positive + margin


@dataclass
class LoraSettings:
    """LoRA (through peft) on every ``nn.Linear`` of the named parts; merged into dense weights on export."""

    parts: list[str] = field(default_factory=lambda: ["backbone"])
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class OmniModule(LightningModule):
    """Shared base: loads a model directory, trains the configured parts with the contrastive core, exports.

    Args:
        model: model directory to start from (weights are handed between phases as directories).
        export_dir: where the trained model directory is written when fit ends (dense, LoRA merged). It must lie
            apart from every input (the model directory, the data root); an existing one is refused unless
            ``export_overwrite`` is set. Both are checked before the first step.
        export_overwrite: replace an existing ``export_dir`` when the fit ends.
        train_parts: parts trained in full (names or groups: ``language_model``, ``vision_encoder``,
            ``audio_encoder``, ``projector``, ``backbone``, ``audio``, ``all``).
        lora: LoRA settings, or ``None`` for no LoRA.
        loss: the contrastive core's settings.
        optimizer: built only from trainable parameters, in named groups.
        scheduler: optional LR scheduler, stepped every optimizer step.
        grad_cache_chunk: turn GradCache on with this chunk size (the datamodule splits sides into chunks of
            this size; the CLI links it).
        group_lr: learning rates of named parameter groups that differ from the optimizer's (groups: ``lora``
            and the parts trained in full, e.g. ``{projector: 1.0e-3}``).
        phase: the prefix of logged metric names (``<phase>/<split>/<metric>/<modality>``).
    """

    phase = "train"

    def __init__(
        self,
        model: str,
        export_dir: str | None = None,
        train_parts: list[str] | None = None,
        lora: LoraSettings | None = None,
        loss: LossSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        grad_cache_chunk: int | None = None,
        group_lr: dict[str, float] | None = None,
        export_overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_dir = str(model)
        self.export_dir = export_dir
        self.export_overwrite = bool(export_overwrite)
        self.train_parts = expand_parts(train_parts or [])
        self.lora_settings = lora
        self.loss_settings = loss or LossSettings()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_cache_chunk = grad_cache_chunk
        self.group_lr = dict(group_lr or {})
        self.automatic_optimization = grad_cache_chunk is None

        self.model: nn.Module = OmniEmbedder.from_pretrained(self.model_dir)
        self.omni_config = self.model.config
        ls = self.loss_settings
        self.loss_fn = ContrastiveLoss(
            temperature=ls.temperature,
            learnable_temperature=ls.learnable_temperature,
            symmetric=ls.symmetric,
            cross_device=ls.cross_device,
            false_negative_margin=ls.false_negative_margin,
        )
        self._set_trainable()
        self.val_r1 = nn.ModuleDict({m: RetrievalHitRate(top_k=1) for m in MODALITIES})

    # ------------------------------------------------------------------ what trains
    @property
    def embedder(self) -> OmniEmbedder:
        """The underlying OmniEmbedder (inside the peft wrapper when LoRA is on)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _set_trainable(self) -> None:
        base: OmniEmbedder = self.model  # type: ignore[assignment]
        base.requires_grad_(False)
        if self.lora_settings is not None:
            from peft import LoraConfig, get_peft_model

            lora_parts = expand_parts(self.lora_settings.parts)
            overlap = set(lora_parts) & set(self.train_parts)
            if overlap:
                raise ValueError(f"parts {sorted(overlap)} are both in lora.parts and train_parts; pick one")
            targets = [
                name
                for part in lora_parts
                for name, mod in base.part(part).named_modules(prefix=base.config.parts[part].rstrip("."))
                if isinstance(mod, nn.Linear)
            ]
            if not targets:
                raise ValueError(f"lora.parts {lora_parts} contain no nn.Linear layer")
            cfg = LoraConfig(
                r=self.lora_settings.r,
                lora_alpha=self.lora_settings.alpha,
                lora_dropout=self.lora_settings.dropout,
                target_modules=targets,
            )
            self.model = get_peft_model(base, cfg)
        for part in self.train_parts:
            base.part(part).requires_grad_(True)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("nothing is trainable: set train_parts and/or lora.parts")

    def configure_optimizers(self) -> Any:
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault("lora" if "lora_" in name else _part_of(name), []).append(p)
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if loss_params:
            groups["temperature"] = loss_params
        param_groups = [{"params": ps, "name": n} for n, ps in groups.items()]
        rank_zero_info(
            "trainable parameters: " + ", ".join(f"{n}={sum(p.numel() for p in ps):,}" for n, ps in groups.items())
        )
        unknown = sorted(set(self.group_lr) - set(groups))
        if unknown:
            raise ValueError(f"group_lr names {unknown}, which are not trainable parameter groups here; "
                             f"the groups are {sorted(groups)}")
        opt = self.optimizer_factory(param_groups)
        for g in opt.param_groups:
            if g["name"] in self.group_lr:
                g["lr"] = float(self.group_lr[g["name"]])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def on_fit_start(self) -> None:
        check_export_strategy(self.trainer.strategy, self.export_dir)
        check_export_dir(self.export_dir, self.export_overwrite, {
            "model directory": self.model_dir,
            "data root": getattr(self.trainer.datamodule, "data_root", None),
        })
        _check_ddp_idle_parts(self)

    # ------------------------------------------------------------------ forward
    def encode_chunks(self, chunks: list[dict[str, Tensor]]) -> Tensor:
        return torch.cat([self.model(c) for c in chunks], 0)

    def _loss_on(self, batch: dict[str, Any]):
        B, K = batch["size"], batch["num_negatives"]

        def loss_fn(q: Tensor, p: Tensor, n: Tensor | None = None) -> Tensor:
            return self.loss_fn(q, p, None if n is None else n.view(B, K, -1))

        sides = [batch["query"], batch["pos"]] + ([batch["neg"]] if batch.get("neg") else [])
        return sides, loss_fn

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        parts = batch["parts"] if "parts" in batch else [batch]  # mixed batch: one part per modality
        total = batch["size"]
        losses: list[Tensor] = []
        if self.automatic_optimization:
            for part in parts:
                sides, loss_fn = self._loss_on(part)
                losses.append(loss_fn(*[self.encode_chunks(s) for s in sides]))
            loss = sum(part["size"] / total * lp for part, lp in zip(parts, losses))
            self._check_finite_loss(loss, batch)  # before backward: nothing is updated
        else:
            opt = self.optimizers()
            no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
            for i, part in enumerate(parts):
                sides, loss_fn = self._loss_on(part)
                w = part["size"] / total
                # gradients of all parts are reduced once, with the last part's last backward
                ctx = no_sync() if (no_sync is not None and i < len(parts) - 1) else contextlib.nullcontext()
                with ctx:
                    lp = grad_cache_step(self.model, sides, lambda *e, f=loss_fn, w=w: w * f(*e),
                                         backward=self.manual_backward, no_sync=no_sync,
                                         needs_grad=self.embedder._reaches_trainable)
                losses.append(lp / w)
            loss = sum(part["size"] / total * lp for part, lp in zip(parts, losses))
            self._check_finite_loss(loss, batch)  # before the optimizer step: nothing is updated
            opt.step()
            opt.zero_grad()
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()
        self.log(catalogue.train_loss(self.phase), loss, prog_bar=True, batch_size=total)
        for part, lp in zip(parts, losses):
            self.log(catalogue.train_loss(self.phase, part["modality"]), lp, batch_size=part["size"])
        self.log(catalogue.skipped(self.phase), float(batch.get("skipped", 0)), reduce_fx="max", batch_size=total)
        for m, share in (batch.get("mix") or {}).items():  # what the sampler actually produced so far
            self.log(catalogue.mix(self.phase, m), float(share), batch_size=total)
        if self.loss_settings.learnable_temperature:
            self.log(catalogue.temperature(self.phase), self.loss_fn.temperature, batch_size=total)
        return loss if self.automatic_optimization else None

    def on_train_epoch_end(self) -> None:
        check = getattr(self.trainer.datamodule, "check_skip_fraction", None)  # an OmniDataModule's
        if callable(check):
            check(final=True)

    # ------------------------------------------------------------------ non-finite values stop the run
    def _check_finite_loss(self, loss: Tensor, batch: dict[str, Any]) -> None:
        self._batch_keys = _batch_keys(batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"{self.phase}: the training loss is {loss.detach().float().item()} at global step "
                                 f"{self.trainer.global_step} (batch of sample keys {self._batch_keys}); stopping "
                                 "without exporting. Check those samples and the learning rate")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient stops the run before the weights change. Under ``16-mixed`` the gradient
        scaler owns overflow (it skips that step and lowers its scale), so gradients are not checked there."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not named or bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()):  # one device sync
            return
        bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
        if bad:
            raise NonFiniteError(f"{self.phase}: non-finite gradients in {len(bad)} parameter(s) (e.g. {bad[:3]}) at "
                                 f"global step {self.trainer.global_step} (batch of sample keys "
                                 f"{getattr(self, '_batch_keys', [])}); stopping without exporting. Check those "
                                 "samples and the learning rate")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        q = self.encode_chunks(batch["query"])
        p = self.encode_chunks(batch["pos"])
        scores = q @ p.T
        labels = batch["labels"]
        B = scores.shape[0]
        if all(lab is not None for lab in labels):
            codes = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
            lab = torch.tensor([codes[x] for x in labels], device=scores.device)
            target = lab[:, None] == lab[None, :]
        else:
            target = torch.eye(B, dtype=torch.bool, device=scores.device)
        # indexes must be unique across batches and ranks so queries are never merged
        offset = (batch_idx * self.trainer.world_size + self.global_rank) * B
        idx = (torch.arange(B, device=scores.device) + offset)[:, None].expand(B, B)
        metric = self.val_r1[batch["modality"]]
        metric.update(scores.flatten(), target.flatten(), indexes=idx.flatten())
        loss = self.loss_fn(q, p)
        self.log(catalogue.val_loss(self.phase, batch["modality"]), loss, batch_size=B, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        for m, metric in self.val_r1.items():
            # every rank takes part in the decision (and in compute's sync) even if it saw no such batch
            if _any_rank_updated(metric, self):
                self.log(catalogue.val_r1(self.phase, m), metric.compute(), sync_dist=False)
            metric.reset()

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path, record: dict[str, Any] | None = None) -> Path:
        """Write a dense model directory (LoRA merged into a copy-free merged model)."""
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.model = model
        model.config.history.append({"step": self.phase, **(record or {})})
        processor = OmniProcessor.from_pretrained(self.model_dir, model.config).processor
        out = model.save_pretrained(directory, processor=processor)
        rank_zero_info(f"exported {self.phase} model to {out}")
        return out

    def export_record(self) -> dict[str, Any]:
        return {
            "from": self.model_dir,
            "global_step": int(self.trainer.global_step) if self._trainer is not None else 0,
            "train_parts": self.train_parts,
            "lora": None if self.lora_settings is None else vars(self.lora_settings),
        }

    def on_fit_end(self) -> None:
        if not self.export_dir:
            return
        if self.trainer.is_global_zero:
            self.export(self.export_dir, self.export_record())
        self.trainer.strategy.barrier("omni-export")


class NonFiniteError(RuntimeError):
    """A non-finite training loss or gradient: the run stops at once and exports nothing."""


def _batch_keys(batch: dict[str, Any]) -> list[str]:
    return [str(k) for k in batch.get("keys") or []]


def check_export_dir(export_dir: str | None, overwrite: bool, inputs: dict[str, str | None]) -> None:
    """Before the first step: the export folder must lie apart from every input (replacing it would delete the
    model being trained or its data), and an existing one is replaced only with ``export_overwrite``."""
    if not export_dir:
        return
    check_output_apart(export_dir, inputs, "model.init_args.export_dir")
    if Path(export_dir).exists() and not overwrite:
        raise FileExistsError(f"model.init_args.export_dir {export_dir} already exists; set "
                              "model.init_args.export_overwrite true to replace it when the fit ends, or choose "
                              "another folder")


def _part_of(name: str) -> str:
    name = re.sub(r"^(base_model\.model\.)", "", name)
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    return "other"


def check_export_strategy(strategy: Any, export_dir: str | None) -> None:
    """Refuse, before the first step, a sharded strategy when the fit ends in an export: rank 0 writes the model
    directory from its own parameters, which under FSDP / DeepSpeed / model parallelism are shards (merging LoRA
    into them would write a broken model after the whole run). Untested without GPUs, so not offered."""
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    if export_dir and isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"--trainer.strategy {type(strategy).__name__}: the export to {export_dir} needs the full, unsharded "
            "weights on rank 0, which omni-lightning does not gather yet. Train with DDP (the default with several "
            "devices; LoRA keeps the optimizer state small), or drop model.init_args.export_dir and export the "
            "checkpoint yourself")


def _check_ddp_idle_parts(module: OmniModule) -> None:
    """Plain DDP fails at the first step that leaves a trainable part without a gradient, with an error from
    inside torch (an audio step while the vision encoder's LoRA trains, a text step in stage 0). Say so before
    the first step, naming the parts, the modalities and the two ways out."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = module.trainer.strategy
    if not isinstance(strategy, DDPStrategy) or getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
        return
    schedule = getattr(module.trainer.datamodule, "schedule", None)  # an OmniDataModule's, after setup("fit")
    if schedule is None:
        return
    idle = {", ".join(sorted(step)): module.embedder.idle_parts(step) for step in schedule.sparsest_steps()}
    idle = {step: parts for step, parts in idle.items() if parts}
    if idle:
        which = "; ".join(f"a step of {step} leaves {', '.join(parts)} unused" for step, parts in idle.items())
        raise ValueError(
            f"DDP without unused-parameter detection cannot train this mix: {which}. Use --trainer.strategy "
            "ddp_find_unused_parameters_true, or --data.init_args.mixed_batches true with a batch size that gives "
            "every modality at least one sample per step")


def _any_rank_updated(metric, module: LightningModule) -> bool:
    seen = torch.tensor(float(metric.update_count > 0), device=module.device)
    if module.trainer.world_size > 1:
        seen = module.trainer.strategy.reduce(seen, reduce_op="max")
    return bool(seen > 0)
