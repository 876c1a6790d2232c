"""Shard sets: layout, writing, reading (index, check, stream) and manifests → shards."""

from omni_lightning.data.shards.layout import INDEX_NAME, SHARD_PATTERN, split_dir
from omni_lightning.data.shards.manifest import ManifestError, shard_manifest
from omni_lightning.data.shards.read import (
    ShardPipeline,
    SkipCounter,
    check_shards,
    iter_samples,
    read_index,
    shard_urls,
)
from omni_lightning.data.shards.write import ShardSetWriter, write_shards

__all__ = [
    "INDEX_NAME", "SHARD_PATTERN", "ManifestError", "ShardPipeline", "ShardSetWriter", "SkipCounter", "check_shards",
    "iter_samples", "read_index", "shard_manifest", "shard_urls", "split_dir", "write_shards",
]
