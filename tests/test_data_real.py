"""The loader on the real datasets in ../shared/data, read as published (no conversion step).
Skipped with a message when the folder is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segcli.data import SegmentationDataset, check_dataset, scan_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset(name: str) -> Path:
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"real dataset {root} not present (clone shared/ beside the repo)")
    return root


def test_isbi_binary_membrane_foreground() -> None:
    root = dataset("isbi2012_membrane")
    report = check_dataset(root, foreground_value=0)
    mapping = report.mapping
    assert mapping.kind == "binary" and mapping.values == [255, 0]
    assert mapping.names[1].startswith("membrane")  # names from classes.csv, by value
    assert report.counts == {"train": 24, "val": 6}
    assert report.splits["train"].sizes == {(512, 512): 24}
    assert 0.15 < report.class_frequencies()[1] < 0.3  # membrane is about 22% of pixels
    image, mask = SegmentationDataset(report.info, "val", size=(128, 128), in_channels=1)[0]
    assert image.shape == (1, 128, 128) and set(mask.unique().tolist()) == {0, 1}


def test_isbi_default_foreground_is_255() -> None:
    mapping = scan_dataset(dataset("isbi2012_membrane")).mapping
    assert mapping.kind == "binary" and mapping.values == [0, 255]


def test_chase_one_bit_masks_odd_sizes() -> None:
    root = dataset("chase_db1")
    info = scan_dataset(root, splits=["val"])
    assert info.mapping.kind == "binary" and info.mapping.num_classes == 2
    image, mask = SegmentationDataset(info, "val", size=(96, 100))[0]
    assert image.shape == (3, 96, 100) and image.dtype == torch.float32
    assert mask.shape == (96, 100) and set(mask.unique().tolist()) == {0, 1}


def test_voc_palette_masks_with_ignore() -> None:
    report = check_dataset(dataset("voc_labelme_tiny"))
    mapping = report.mapping
    assert mapping.kind == "palette" and mapping.num_classes == 21
    assert mapping.names[0] == "_background_" and mapping.names[15] == "person"
    assert mapping.palette[15] == (192, 128, 128)  # the VOC colour map, read from the PNG
    assert report.splits["train"].ignored_pixels > 0
    _, mask = SegmentationDataset(report.info, "train", size=(64, 64))[0]
    assert 255 in mask.unique().tolist() and mask.max() == 255
    assert set(mask.unique().tolist()) - {255} <= set(range(21))
