"""Data: the shard schema, shard sets (write / index / check / stream), the demo corpus and the datamodule.

Public names of the schema, shard and demo modules are re-exported here; the datamodule lives in
``omni_lightning.data.datamodule`` (imported lazily: it needs Lightning).
"""

from .demo import demo_captions, demo_samples, demo_vocabulary, make_demo_data
from .schema import (
    ITEM_TYPES,
    MODALITIES,
    SCHEMA_VERSION,
    SchemaError,
    decode_sample,
    encode_item,
    encode_record,
    validate_record,
)
from .shards import (
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
    "demo_captions",
    "demo_samples",
    "demo_vocabulary",
    "encode_item",
    "encode_record",
    "iter_samples",
    "make_demo_data",
    "read_index",
    "shard_manifest",
    "shard_urls",
    "split_dir",
    "validate_record",
    "write_shards",
]
