"""Decoupled Specialist Fusion: merge specialists' task vectors into one model, streaming safetensors.

``omni-lightning fuse --config configs/fuse.yaml`` (that file documents every option) or, from Python::

    from omni_lightning.fusion import FuseConfig, fuse
    fuse(FuseConfig(base="runs/demo/base", specialists=["runs/demo/specialists/image", ...],
                    alpha=[0.3, ...], out="runs/demo/fused"))

The package, in the order data flows: :mod:`.config` (options) → :mod:`.checkpoint` (read and validate input
headers; the streaming reader) → :mod:`.plan` (which output tensor comes from which inputs: ownership) →
:mod:`.engine` (stream chunks through a method of :mod:`.methods`) → :mod:`.writer` (safetensors shards) and
:mod:`.diagnostics` (task-vector norms and cosines). The engine's docstring describes the methods, ownership
and streaming in full.
"""

from omni_lightning.fusion.checkpoint import read_header
from omni_lightning.fusion.config import (
    METHODS,
    DareOptions,
    FuseConfig,
    FusionError,
    LinearOptions,
    PartRule,
    TiesOptions,
    load_config,
    validate_config,
)
from omni_lightning.fusion.diagnostics import (
    DIAGNOSTICS_JSON,
    DIAGNOSTICS_PNG,
    format_diagnostics,
    plot_diagnostics,
)
from omni_lightning.fusion.engine import FuseResult, fuse, run_cli
from omni_lightning.fusion.methods import (
    REGISTRY,
    MergeMethod,
    dare_keep_mask,
    make_method,
)
from omni_lightning.fusion.plan import build_plan

__all__ = [
    "DIAGNOSTICS_JSON", "DIAGNOSTICS_PNG", "METHODS", "REGISTRY", "DareOptions", "FuseConfig", "FuseResult",
    "FusionError", "LinearOptions", "MergeMethod", "PartRule", "TiesOptions", "build_plan", "dare_keep_mask",
    "format_diagnostics", "fuse", "load_config", "make_method", "plot_diagnostics", "read_header", "run_cli",
    "validate_config",
]
