"""CIFAR data on the training device, and the non-IID splits users study."""

from .batches import DeviceBatches, SingleExamples
from .cifar import DATASETS, DataError, ImageDataset, load
from .partition import SCHEMES, Partition, PartitionError, PartitionSpec, make_partition
from .partition_cache import cached_partition
from .report import format_summary, label_counts, partition_record, summarize, write_partition_json

__all__ = [
    "DATASETS",
    "DataError",
    "DeviceBatches",
    "ImageDataset",
    "Partition",
    "PartitionError",
    "PartitionSpec",
    "SCHEMES",
    "SingleExamples",
    "cached_partition",
    "format_summary",
    "label_counts",
    "load",
    "make_partition",
    "partition_record",
    "summarize",
    "write_partition_json",
]
