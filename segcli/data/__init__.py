"""The data layer: reading dataset folders, the class mapping, augmentation, checks, loaders and
the bundled mock dataset.

`mock_root` is defined here without importing torch, so CLI modules can use it as a default at
parse time; everything else is imported on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_EXPORTS = {
    "read_image": "io",
    "image_from_array": "io",
    "decode_image_bytes": "io",
    "read_mask": "io",
    "to_channels": "io",
    "IMAGE_EXTENSIONS": "io",
    "ClassMapping": "classes",
    "read_class_table": "classes",
    "DatasetInfo": "dataset",
    "DatasetError": "dataset",
    "SegmentationDataset": "dataset",
    "scan_dataset": "dataset",
    "AugmentConfig": "transforms",
    "build_transforms": "transforms",
    "default_normalization": "transforms",
    "parse_size": "transforms",
    "DatasetReport": "checks",
    "check_dataset": "checks",
    "build_loader": "loader",
    "batches_by_size": "loader",
    "image_sizes": "loader",
    "native_masks_collate": "loader",
}

__all__ = ["mock_root", *_EXPORTS]


def mock_root() -> Path:
    """The bundled mock dataset (package data): the default of every `--data`."""
    return Path(__file__).resolve().parent / "mock"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"segcli.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'segcli.data' has no attribute '{name}'")
