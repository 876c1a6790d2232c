"""Lightning callbacks of omni-lightning (importable as ``omni_lightning.callbacks``)."""

from omni_lightning.callbacks.freeze_backbone import FreezeBackbone
from omni_lightning.callbacks.projector_drift import ProjectorDrift, measure_drift

__all__ = ["FreezeBackbone", "ProjectorDrift", "measure_drift"]
