"""Data: the shard schema, shard sets (write / index / check / stream), the balanced sampler and the datamodule.

Public names of the schema and shard modules are re-exported here (the demo corpus is :mod:`omni_lightning.demo`); the datamodule lives in
``omni_lightning.data.datamodule`` (imported lazily: it needs Lightning).
"""

from omni_lightning.data.schema import (
    ITEM_TYPES,
    MODALITIES,
    SCHEMA_VERSION,
    SchemaError,
    decode_sample,
    encode_item,
    encode_record,
    validate_record,
)
from omni_lightning.data.shards import (
    ManifestError,
    ShardSetWriter,
    SkipCounter,
    check_shards,
    iter_samples,
    read_index,
    shard_manifest,
    shard_urls,
    split_dir,
    write_shards,
)

__all__ = [
    "ITEM_TYPES",
    "MODALITIES",
    "SCHEMA_VERSION",
    "SchemaError",
    "ManifestError",
    "ShardSetWriter",
    "SkipCounter",
    "check_shards",
    "decode_sample",
    "encode_item",
    "encode_record",
    "iter_samples",
    "read_index",
    "shard_manifest",
    "shard_urls",
    "split_dir",
    "validate_record",
    "write_shards",
]
