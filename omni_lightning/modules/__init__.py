"""One LightningModule per phase, all thin, all on :class:`OmniModule` (which owns the contrastive core)."""

from omni_lightning.modules.base import LoraSettings, LossSettings, OmniModule
from omni_lightning.modules.joint import JointModule
from omni_lightning.modules.pretrain import PretrainModule
from omni_lightning.modules.recover import RecoveryModule
from omni_lightning.modules.rehearse import RehearsalModule
from omni_lightning.modules.specialist import SpecialistModule

__all__ = ["JointModule", "LoraSettings", "LossSettings", "OmniModule", "PretrainModule", "RecoveryModule", "RehearsalModule",
           "SpecialistModule"]
