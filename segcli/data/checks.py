"""Dataset checks, run before training and by `seg check`: every file is decoded once, so a bad
dataset fails in seconds with one line per problem instead of mid-epoch with a traceback."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli.data.classes import ClassMapping
from segcli.data.dataset import DatasetError, DatasetInfo, scan_dataset
from segcli.data.io import read_image, read_mask
from segcli.errors import UsageError


@dataclass
class SplitStats:
    """What one split holds: image count, sizes (H, W) and channel counts seen, pixels per class."""

    images: int = 0
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    channels: Counter[int] = field(default_factory=Counter)
    class_pixels: list[int] = field(default_factory=list)
    ignored_pixels: int = 0

    def sizes_text(self) -> str:
        if not self.sizes:
            return "-"
        if len(self.sizes) == 1:
            ((height, width),) = self.sizes
            return f"{height}x{width}"
        heights = [h for h, _ in self.sizes]
        widths = [w for _, w in self.sizes]
        return (
            f"{len(self.sizes)} sizes, H {min(heights)}..{max(heights)}, "
            f"W {min(widths)}..{max(widths)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "sizes": {f"{h}x{w}": n for (h, w), n in sorted(self.sizes.items())},
            "channels": {str(c): n for c, n in sorted(self.channels.items())},
            "class_pixels": list(self.class_pixels),
            "ignored_pixels": self.ignored_pixels,
        }


@dataclass
class DatasetReport:
    """The result of a successful check; `info` is ready for `SegmentationDataset`."""

    info: DatasetInfo
    splits: dict[str, SplitStats]

    @property
    def root(self) -> Path:
        return self.info.root

    @property
    def mapping(self) -> ClassMapping:
        return self.info.mapping

    @property
    def counts(self) -> dict[str, int]:
        return {name: stats.images for name, stats in self.splits.items()}

    def class_frequencies(self, split: str | None = "train") -> list[float]:
        """Fraction of labelled (non-ignored) pixels in each class, over `split` (all splits if
        None or absent): the input of class-weighted cross-entropy."""
        chosen = [self.splits[split]] if split in self.splits else list(self.splits.values())
        totals = np.sum([stats.class_pixels for stats in chosen], axis=0, dtype=np.float64)
        labelled = totals.sum()
        if labelled == 0:
            return [0.0] * self.mapping.num_classes
        return (totals / labelled).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "format": self.info.format,
            "classes_file": str(self.info.classes_file) if self.info.classes_file else None,
            "mapping": self.mapping.to_dict(),
            "splits": {name: stats.to_dict() for name, stats in self.splits.items()},
            "class_frequencies": self.class_frequencies(),
        }

    def render(self) -> Any:
        """A rich renderable: a summary line, a table of splits and a table of classes."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        mapping = self.mapping
        source = f" (classes from {self.info.classes_file.name})" if self.info.classes_file else ""
        header = Text(f"{self.root}: valid {self.info.format} layout, {mapping.describe()}{source}")
        splits = Table(title="splits", title_justify="left")
        for column in ("split", "images", "sizes (HxW)", "channels", "ignored px"):
            splits.add_column(
                column, justify="right" if column in ("images", "ignored px") else "left"
            )
        for name, stats in self.splits.items():
            channels = ", ".join(f"{c}ch x{n}" for c, n in sorted(stats.channels.items()))
            splits.add_row(
                name, str(stats.images), stats.sizes_text(), channels, f"{stats.ignored_pixels:,}"
            )
        classes = Table(title="class pixel frequencies", title_justify="left")
        classes.add_column("id", justify="right")
        classes.add_column("name")
        classes.add_column("mask value" if mapping.kind != "rgb" else "colour")
        for name in self.splits:
            classes.add_column(name, justify="right")
        raw = mapping.raw_values()
        per_split = {name: self._split_fractions(name) for name in self.splits}
        for index, class_name in enumerate(mapping.names):
            color = mapping.palette[index]
            key = str(raw[index]) if mapping.kind != "rgb" else "#{:02x}{:02x}{:02x}".format(*color)
            cells = [f"{per_split[name][index]:.2%}" for name in self.splits]
            classes.add_row(str(index), class_name, key, *cells)
        return Group(header, splits, classes)

    def _split_fractions(self, split: str) -> list[float]:
        pixels = np.asarray(self.splits[split].class_pixels, dtype=np.float64)
        total = pixels.sum()
        return (pixels / total).tolist() if total else [0.0] * len(pixels)


def check_dataset(
    root: str | Path,
    classes_file: str | Path | None = None,
    *,
    foreground_value: int | None = None,
    mapping: ClassMapping | None = None,
    required_splits: Sequence[str] = ("train", "val"),
    data_format: str | None = None,
    ignore_values: Sequence[int] = (),
    reduce_zero_label: bool | None = None,
    cache: Path | None = None,
) -> DatasetReport:
    """Check a dataset folder and report on it.

    Finds, each as one line naming the file and what to do: missing or empty splits, images
    without masks and masks without images, non-image or unreadable files, masks whose values map
    to no class, and image/mask size mismatches. Raises DatasetError (a UsageError, exit 2) with
    every problem; returns a DatasetReport otherwise. Other arguments as for `scan_dataset`.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UsageError(f"{root_path}: dataset folder not found; check the path")
    info = scan_dataset(
        root_path,
        classes_file,
        foreground_value=foreground_value,
        mapping=mapping,
        data_format=data_format,
        ignore_values=ignore_values,
        reduce_zero_label=reduce_zero_label,
        cache=cache,
    )
    missing = [split for split in required_splits if split not in info.splits]
    if missing:
        have = ", ".join(info.splits) or "none"
        raise DatasetError(
            [
                f"{root_path}: no '{split}' split in its {info.format} layout (found: {have}); "
                f"add {split}/images and {split}/masks"
                for split in missing
            ]
        )
    problems: list[str] = []
    stats: dict[str, SplitStats] = {}
    num_classes = info.mapping.num_classes
    for split, pairs in info.splits.items():
        split_stats = stats[split] = SplitStats(len(pairs), class_pixels=[0] * num_classes)
        for image_path, mask_path in pairs:
            _check_pair(info, image_path, mask_path, split_stats, problems)
    if problems:
        raise DatasetError(problems)
    return DatasetReport(info, stats)


def _check_pair(
    info: DatasetInfo,
    image_path: Path,
    mask_path: Path,
    stats: SplitStats,
    problems: list[str],
) -> None:
    """Decode one pair, add its sizes and class pixels to `stats`, or add its problems."""
    image = mask = None
    try:
        image = read_image(image_path)
    except UsageError as error:
        problems.append(str(error))
    try:
        raw = read_mask(mask_path)
        mask = info.mapping.encode(raw, mask_path)
    except UsageError as error:
        problems.append(str(error))
    if image is None or mask is None:
        return
    image_size = (int(image.shape[-2]), int(image.shape[-1]))
    if image_size != mask.shape:
        problems.append(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but {image_path.name} is "
            f"{image_size[0]}x{image_size[1]} (HxW); resize the mask (nearest) to match its image"
        )
        return
    stats.sizes[image_size] += 1
    stats.channels[int(image.shape[0])] += 1
    ignored = mask == info.mapping.ignore_index
    stats.ignored_pixels += int(ignored.sum())
    counts = np.bincount(mask[~ignored], minlength=info.mapping.num_classes)
    stats.class_pixels = [a + int(b) for a, b in zip(stats.class_pixels, counts, strict=True)]
