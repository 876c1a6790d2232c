"""omni-lightning: omni-modal embedding training by the Conan-embedding-v3 recipe, as Lightning modules.

Importing the package registers the model folders' ``omni_embedder`` type with transformers' Auto classes, so
``AutoModel.from_pretrained(model_dir)`` opens a trained folder (no remote code).
"""

__version__ = "0.1.0"

from omni_lightning import model as _model  # noqa: E402,F401  (registers omni_embedder with the Auto classes)
