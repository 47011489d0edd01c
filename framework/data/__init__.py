"""Data for vlmc: the `Sample` record, synthetic on-device tasks and the JSONL + image loader.

`VLMDataModule` (``framework.data.datamodule``) is also importable from here; it loads on first use, so the
light data classes import without Lightning.
"""

from typing import Any

from framework.data.jsonl import JsonlDataset
from framework.data.sample import Sample, parse_fields
from framework.data.tasks import (
    TASKS,
    AutofillTask,
    CaptionTask,
    LongCallTask,
    ReadingTask,
    SyntheticTask,
    make_task,
)

__all__ = [
    "TASKS",
    "AutofillTask",
    "CaptionTask",
    "JsonlDataset",
    "LongCallTask",
    "ReadingTask",
    "Sample",
    "SyntheticTask",
    "VLMDataModule",
    "make_task",
    "parse_fields",
]


def __getattr__(name: str) -> Any:
    if name == "VLMDataModule":
        from framework.data.datamodule import VLMDataModule

        return VLMDataModule
    raise AttributeError(f"module 'framework.data' has no attribute {name!r}")
