"""Plain-PyTorch model code: OmniEmbedder, its processor, config, the tiny preset and real-checkpoint assembly."""

from omni_lightning.model import hf as _hf
from omni_lightning.model.config import PART_PREFIXES, OmniConfig, expand_parts
from omni_lightning.model.omni import OmniEmbedder, load_model_and_processor, pool
from omni_lightning.model.processor import OmniProcessor

__all__ = ["PART_PREFIXES", "OmniConfig", "OmniEmbedder", "OmniProcessor", "expand_parts", "load_model_and_processor", "pool"]

_hf.register()  # AutoConfig / AutoModel / AutoProcessor know model type "omni_embedder"
