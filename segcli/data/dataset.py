"""The dataset folder (`train/` and `val/`, each with `images/` and `masks/`): pairing
images with masks, deciding the class mapping once for the whole dataset, and the torch
Dataset that yields normalised image/mask pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from segcli.data.classes import (
    IGNORE_INDEX,
    ClassMapping,
    ClassTable,
    default_palette,
    find_class_table,
    read_class_table,
)
from segcli.data.io import (
    read_header,
    read_image,
    read_mask,
    read_palette,
    to_channels,
)
from segcli.data.layouts import read_layout
from segcli.data.transforms import AugmentConfig, build_transforms, default_normalization
from segcli.errors import UsageError

# Without a class table, index masks may hold at most this many classes; a larger value almost
# always means gray-level or anti-aliased masks rather than class indices.
MAX_INFERRED_CLASSES = 100
_GRAY_MODES = frozenset({"1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBX"})


class DatasetError(UsageError):
    """An invalid dataset: `problems` holds one line per problem; the message is the first one
    (with a count of the rest), so the CLI still prints a single line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' * (more != 1)}; run 'seg check')" if more else ""
        super().__init__(self.problems[0] + suffix)


Pair = tuple[Path, Path]


@dataclass
class DatasetInfo:
    """A scanned dataset: its root, the class mapping and the image/mask pairs of each split
    (sorted by stem, so the order is the same on every machine)."""

    root: Path
    mapping: ClassMapping
    splits: dict[str, list[Pair]]
    classes_file: Path | None = None
    format: str = "folders"

    def pairs(self, split: str) -> list[Pair]:
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise UsageError(
                f"{self.root}: has no '{split}' split (found: {have}); "
                f"add {split}/images and {split}/masks"
            )
        return self.splits[split]


def _table_mapping(
    table: ClassTable, modes: set[str], first_mask: Path, ignored: list[int], reduce: bool
) -> ClassMapping:
    """The mapping a class table implies for masks of the given Pillow modes: colours for colour
    masks when the table has them, raw values otherwise (gray masks saved as RGB included)."""
    if modes & _COLOR_MODES and table.colors is not None:
        return ClassMapping("rgb", table.names, table.colors, ignore_colors=table.ignore_colors)
    palette = table.colors
    kind = "index"
    if modes <= {"P", "PA"}:
        kind = "palette"
        palette = palette or read_palette(first_mask)[: len(table.names)]
    values = table.values
    if reduce:
        values = values or list(range(1, len(table.names) + 1))
    return ClassMapping(
        kind,
        table.names,
        palette or [],
        values=values,
        ignore_values=ignored,
        reduce_zero_label=reduce,
    )


def _unique_values(pairs: list[Pair], problems: list[str]) -> dict[int, Path]:
    """Every raw value in the masks, with the first file holding it (for error messages)."""
    seen: dict[int, Path] = {}
    for _, mask_path in pairs:
        try:
            mask = read_mask(mask_path)
        except UsageError as error:
            problems.append(str(error))
            continue
        if mask.ndim == 3:
            if not (mask == mask[:, :, :1]).all():
                problems.append(
                    f"{mask_path}: is an RGB colour mask; give a class table with a colour per "
                    "class (classes.json in the dataset root or `classes_file`)"
                )
                continue
            mask = mask[:, :, 0]  # a gray mask saved as RGB
        for value in np.unique(mask).tolist():
            seen.setdefault(int(value), mask_path)
    return seen


def _binary_mapping(
    values: set[int], foreground_value: int, table: ClassTable | None, ignored: list[int]
) -> ClassMapping:
    others = sorted(values - {foreground_value})
    background = others[0] if others else (0 if foreground_value != 0 else 255)
    names = ["background", "foreground"]
    if table is not None and table.values is not None and len(table.names) == 2:
        by_value = dict(zip(table.values, table.names, strict=True))
        if {background, foreground_value} <= set(by_value):
            names = [by_value[background], by_value[foreground_value]]
    return ClassMapping(
        "binary",
        names,
        [(0, 0, 0), (255, 255, 255)],
        values=[background, foreground_value],
        foreground_value=foreground_value,
        ignore_values=ignored,
    )


def _infer_mapping(
    pairs: list[Pair],
    modes: set[str],
    table: ClassTable | None,
    foreground_value: int | None,
    problems: list[str],
    ignored: list[int],
    reduce: bool,
) -> ClassMapping | None:
    first_mask = pairs[0][1]
    if table is not None and (modes & _COLOR_MODES or foreground_value is None):
        table_values = set(table.values) if table.values is not None else None
        if table_values != {0, 255}:
            return _table_mapping(table, modes, first_mask, ignored, reduce)
    seen = _unique_values(pairs, problems)
    values = set(seen) - set(ignored)
    if problems:
        return None
    if foreground_value is not None:
        if foreground_value not in values:
            seen_text = ", ".join(str(v) for v in sorted(values)[:10])
            problems.append(
                f"`foreground` {foreground_value}: no mask holds that value (values seen: "
                f"{seen_text}); pick the value of the foreground pixels"
            )
            return None
        if len(values - {foreground_value}) > 1:
            extra = sorted(values - {foreground_value})[1]
            problems.append(
                f"{seen[extra]}: value {extra} in a binary dataset (`foreground` "
                f"{foreground_value}); binary masks hold two values, fix the mask"
            )
            return None
        return _binary_mapping(values, foreground_value, table, ignored)
    if not reduce and (modes == {"1"} or (255 in values and values <= {0, 255})):
        return _binary_mapping(values, 255, table, ignored)
    labels = values - {IGNORE_INDEX}
    top = max(labels, default=0)
    if top >= MAX_INFERRED_CLASSES + reduce:
        problems.append(
            f"{seen[top]}: value {top} maps to no class (over "
            f"{MAX_INFERRED_CLASSES} classes without a class table); fix the mask or give a "
            "class table (classes.json or `classes_file`)"
        )
        return None
    first = int(reduce)
    raw = list(range(first, top + 1)) if top >= first else [first]
    names = [f"class_{value}" for value in raw]
    common = {
        "values": raw if reduce else None,
        "ignore_values": ignored,
        "reduce_zero_label": reduce,
    }
    if modes <= {"P", "PA"}:
        return ClassMapping("palette", names, read_palette(first_mask)[first : top + 1], **common)
    return ClassMapping("index", names, default_palette(len(names)), **common)


def scan_dataset(
    root: str | Path,
    classes_file: str | Path | None = None,
    *,
    foreground_value: int | None = None,
    mapping: ClassMapping | None = None,
    splits: Sequence[str] | None = None,
    data_format: str | None = None,
    ignore_values: Sequence[int] = (),
    reduce_zero_label: bool | None = None,
    cache: Path | None = None,
) -> DatasetInfo:
    """Find every split's images and masks in the dataset's layout (see `segcli.data.layouts`)
    and decide the class mapping once for all splits.

    The mapping comes from, in order: `mapping` (e.g. one stored in a checkpoint); a class table
    (`classes_file`, else the classes the format defines, else classes.json / classes.csv /
    class_names.txt / classes.txt in `root`); the masks themselves (mode '1' or 0/255 values:
    binary; palette PNGs: palette; else index with max value + 1 classes). `foreground_value`
    makes the masks binary with that raw value as class 1 (e.g. 0 for ISBI membranes); by
    default 255 is the foreground of 0/255 masks. `ignore_values` are raw values read as
    ignore besides 255; `reduce_zero_label` (default: the layout's convention, on for ADE20K)
    reads raw 0 as ignore and raw k as class k-1. Raises DatasetError listing every problem.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"{root}: dataset folder not found; check `data`")
    layout = read_layout(root, data_format, cache, mapping.names if mapping else None)
    problems = list(layout.problems)
    found = layout.splits
    if splits is not None:
        for split in splits:
            if split not in found:
                have = ", ".join(found) or "none"
                problems.append(f"{root}: has no '{split}' split (found: {have})")
        found = {split: found[split] for split in splits if split in found}
    if not found and not problems:
        problems.append(f"{root}: no images found in its {layout.name} layout")
    if problems:
        raise DatasetError(problems)

    table_path = Path(classes_file).expanduser() if classes_file else find_class_table(root)
    if mapping is None:
        table = None
        if classes_file is not None or layout.table is None:
            table = read_class_table(table_path) if table_path is not None else None
        else:
            table, table_path = layout.table, None
        reduce = layout.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
        # Reduce-zero-label reads raw 0 ("other") as ignore, whichever way the mapping is made.
        ignored = sorted(
            {*ignore_values, *(table.ignore_values if table else []), *([0] if reduce else [])}
        )
        all_pairs = [pair for pairs in found.values() for pair in pairs]
        modes: set[str] = set()
        for _, mask_path in all_pairs:
            try:
                modes.add(read_header(mask_path)[0])
            except UsageError as error:
                problems.append(str(error))
        unknown = modes - _GRAY_MODES - _COLOR_MODES
        if unknown:
            problems.append(
                f"{root}: masks of mode {', '.join(sorted(unknown))}; save masks as gray, palette "
                "or RGB images"
            )
        if not problems:
            mapping = _infer_mapping(
                all_pairs, modes, table, foreground_value, problems, ignored, reduce
            )
        if problems or mapping is None:
            raise DatasetError(problems)
        mapping.ignore_unlisted = layout.ignore_unlisted
    return DatasetInfo(root, mapping, found, table_path, layout.name)


class SegmentationDataset(Dataset):
    """One split of a scanned dataset: `(image, mask)` with image float32 C×H×W normalised and
    mask int64 H×W (class indices, `ignore_index` for ignored pixels), both resized to `size`.
    With `scale` (native-resolution patches), images are resized by that factor instead and
    `size` is the random crop (None: whole images, for sliding-window evaluation)."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        size: tuple[int, int] | None = (256, 256),
        in_channels: int = 3,
        augment: AugmentConfig | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        native_masks: bool = False,
        scale: float | None = None,
    ) -> None:
        self.info = info
        self.split = split
        self.pairs = info.pairs(split)
        self.mapping = info.mapping
        self.size = size
        self.in_channels = in_channels
        default_mean, default_std = default_normalization(in_channels)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.transform = build_transforms(size, augment, self.mean, self.std, scale=scale)
        # Full-resolution scoring: the image is prepared for the model exactly as `seg predict`
        # prepares it (one antialiased resize of the decoded image, then normalisation) and the
        # mask stays at the image's own size, where predictions are scored.
        self.native_masks = native_masks
        if native_masks and augment is not None:
            raise ValueError("native_masks is for evaluation, without augmentation")

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair before transforms: image (uint8 or float) with `in_channels` channels and
        the encoded int64 mask. Raises UsageError if their sizes differ."""
        image_path, mask_path = self.pairs[index]
        image = to_channels(read_image(image_path), self.in_channels, source=image_path)
        mask = self.mapping.encode(read_mask(mask_path), mask_path)
        if tuple(image.shape[-2:]) != mask.shape:
            raise UsageError(
                f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but {image_path.name} is "
                f"{image.shape[-2]}x{image.shape[-1]} (HxW); masks must match their image's size"
            )
        return image, torch.from_numpy(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image, mask = self.load(index)
        if self.native_masks:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), mask.long()
        image_out, mask_out = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image_out.as_subclass(torch.Tensor), mask_out.as_subclass(torch.Tensor).long()
