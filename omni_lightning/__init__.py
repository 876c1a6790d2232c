"""omni-lightning: omni-modal embedding training by the Conan-embedding-v3 recipe, as Lightning modules."""

__version__ = "0.1.0"
