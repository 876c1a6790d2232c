"""The training subcommands (``fit``, ``validate``, ``test``, ``predict``): LightningCLI over every phase module.

Weights move between phases as model directories (``--model.init_args.model DIR``), never through
``--ckpt_path`` (which restores the checkpoint's saved hyper-parameters over your config and is meant only
for resuming the same phase).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from omni_lightning import modules  # noqa: F401  (register the phase modules' short class names)
from omni_lightning.data.datamodule import OmniDataModule
from omni_lightning.modules.base import OmniModule

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class OmniCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the datamodule builds inputs with the processor of the model it trains, and splits sides
        # into GradCache chunks of the module's chunk size
        parser.link_arguments("model.init_args.model", "data.init_args.model")
        parser.link_arguments("model.init_args.grad_cache_chunk", "data.init_args.chunk_size")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> OmniCLI:
    """LightningCLI with subclass mode for model and data, and the optimizer built by the module itself (only
    from parameters that require grad, in named groups). ``args=None`` reads ``sys.argv``."""
    return OmniCLI(
        model_class=OmniModule,
        datamodule_class=OmniDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )
