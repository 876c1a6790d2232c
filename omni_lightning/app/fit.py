"""The training subcommands (``fit``, ``validate``, ``test``, ``predict``): LightningCLI over every phase module.

Weights move between phases as model directories (``--model.init_args.model DIR``), never through
``--ckpt_path`` (which restores the checkpoint's saved hyper-parameters over your config and is meant only
for resuming the same phase).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from omni_lightning import modules  # noqa: F401  (register the phase modules' short class names)
from omni_lightning.data.datamodule import OmniDataModule
from omni_lightning.modules.base import OmniModule

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# inputs of a fit that must exist before anything is built: (config key, what it is)
REQUIRED_INPUTS = (("model.init_args.model", "model directory"), ("data.init_args.data_root", "dataset root"))


def run_config_dir(trainer: Trainer, pl_module: LightningModule) -> str:
    """Where a run's ``config.yaml`` goes: the CSV / TensorBoard logger's own version folder, else
    ``<save_dir>/<run name>`` (a W&B logger's ``save_dir`` is shared by every phase: without the run name each
    phase would overwrite the previous one's file), else the trainer's ``default_root_dir``."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return trainer.default_root_dir
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return logger.log_dir
    name = (getattr(logger, "_wandb_init", None) or {}).get("name") or getattr(pl_module, "phase", None) or "run"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(name))


class OmniSaveConfig(SaveConfigCallback):
    """Write the resolved config to the run's own folder (:func:`run_config_dir`) and put all of it (model, data,
    trainer, seed) into the W&B run's config."""

    config_path: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.strategy.broadcast(run_config_dir(trainer, pl_module))
        path = os.path.join(log_dir, self.config_filename)
        if trainer.is_global_zero:
            if not self.overwrite and os.path.isfile(path):
                raise RuntimeError(f"{path} exists; refusing to overwrite a previous run's config")
            os.makedirs(log_dir, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
            self.config_path = path
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._to_wandb(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # again after Lightning logged the module's hyper-parameters, whose ``model`` (a path) shares the key
        if trainer.is_global_zero:
            self._to_wandb(trainer)

    def _to_wandb(self, trainer: Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        resolved = resolved_config(self.parser, self.config)
        for lg in loggers:
            lg.experiment.config.update(resolved, allow_val_change=True)


def resolved_config(parser, config) -> dict[str, Any]:
    """The full resolved config as plain data (what ``config.yaml`` holds)."""
    return yaml.safe_load(parser.dump(config, skip_none=False)) or {}


def _given(args: list[str], key: str) -> tuple[str | None, str]:
    """The last value of ``key`` among ``--config`` files and ``--key value`` overrides, and where it came from."""
    value, where = None, ""
    short = key.replace(".init_args.", ".")
    i = 0
    while i < len(args):
        tok = args[i]
        name, eq, inline = tok.partition("=")
        val = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        step = 1 if eq else 2
        if name == "--config" and val:
            try:
                data = yaml.safe_load(Path(val).read_text()) or {}
            except (OSError, yaml.YAMLError):
                data = {}
            node: Any = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, (str, Path)):
                value, where = str(node), f" (from {val})"
            i += step
            continue
        if name in (f"--{key}", f"--{short}") and val is not None:
            value, where = val, ""
            i += step
            continue
        i += 1
    return value, where


def check_inputs(args: list[str]) -> None:
    """A missing model directory or dataset root ends the command with one line naming the key and the path
    (instead of the parser's account of every option it could not build)."""
    if not args or args[0] not in ("fit", "validate", "test", "predict") or any(
            a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        return
    for key, what in REQUIRED_INPUTS:
        value, where = _given(args[1:], key)
        if value and not Path(value).expanduser().exists():
            print(f"omni-lightning {args[0]}: error: {key}: {what} {value!r} does not exist{where}", file=sys.stderr)
            raise SystemExit(2)


class OmniCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the datamodule builds inputs with the processor of the model it trains, and splits sides
        # into GradCache chunks of the module's chunk size
        parser.link_arguments("model.init_args.model", "data.init_args.model")
        parser.link_arguments("model.init_args.grad_cache_chunk", "data.init_args.chunk_size")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> OmniCLI:
    """LightningCLI with subclass mode for model and data, and the optimizer built by the module itself (only
    from parameters that require grad, in named groups). ``args=None`` reads ``sys.argv``."""
    check_inputs(list(sys.argv[1:] if args is None else args))
    return OmniCLI(
        model_class=OmniModule,
        datamodule_class=OmniDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=OmniSaveConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )
