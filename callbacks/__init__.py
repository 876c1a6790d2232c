"""Lightning callbacks of omni-lightning (importable as ``omni_lightning.callbacks``)."""

from omni_lightning.callbacks.freeze_backbone import FreezeBackbone
from omni_lightning.callbacks.learning_rate import LearningRate
from omni_lightning.callbacks.preemption import Preemption
from omni_lightning.callbacks.progress_log import ProgressLog
from omni_lightning.callbacks.projector_drift import ProjectorDrift
from omni_lightning.callbacks.retrieval_eval import RetrievalEval
from omni_lightning.callbacks.retrieval_examples import RetrievalExamples
from omni_lightning.callbacks.throughput import Throughput
from omni_lightning.callbacks.wandb_sync import WandbOfflineSync

__all__ = ["FreezeBackbone", "LearningRate", "Preemption", "ProgressLog", "ProjectorDrift", "RetrievalEval", "RetrievalExamples", "Throughput",
           "WandbOfflineSync"]
