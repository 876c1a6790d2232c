"""Where shard sets live: ``ROOT/<modality>/<split>/shard-NNNNNN.tar`` plus ``index.json``."""

from __future__ import annotations

import os
from pathlib import Path

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"


def split_dir(root: str | os.PathLike, modality: str, split: str) -> Path:
    """``ROOT/<modality>/<split>``."""
    return Path(root) / modality / split
