"""Dataset layouts: where a dataset keeps its images and masks, in the formats the field
publishes them, read directly so nobody writes a conversion script first.

Detected in this order (`--format` forces one):

- ``voc``: Pascal VOC, ``ImageSets/Segmentation/{train,val}.txt`` listing ids of
  ``JPEGImages/ID.jpg`` and ``SegmentationClass/ID.png`` (palette PNGs, 255 = border, ignored);
  the 21 VOC classes and colours. The root may also be a ``VOCdevkit`` holding one ``VOC*``.
- ``cityscapes``: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with
  ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png``, label ids mapped to the 19 training classes
  (every other id ignored), with the official names and colours.
- ``ade20k``: ADEChallengeData2016, ``images/{training,validation}`` with
  ``annotations/{training,validation}``; reduce-zero-label on (raw 0 = other, ignored; raw k is
  class k-1), class names from ``objectInfo150`` when present.
- ``coco``: COCO instances JSON, ``annotations/instances_SPLIT*.json`` with images in
  ``SPLIT*/`` or ``images/SPLIT*/`` (or Roboflow's ``SPLIT/_annotations.coco.json`` beside its
  images); rasterised once to class masks in a cache (class 0 = background).
- ``folders``: segcli's own ``SPLIT/images`` + ``SPLIT/masks``.
- ``labelme``: LabelMe JSON files beside their images, in split folders or in the root;
  rasterised once like COCO.
- ``flat``: one ``images/`` + ``masks/`` pair in the root, read as the train split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segcli.data.classes import ClassTable, default_palette
from segcli.errors import UsageError, choose

FORMATS = ("voc", "cityscapes", "ade20k", "coco", "folders", "labelme", "flat")
SPLIT_ORDER = ("train", "val", "test")
# The image files segcli reads (decode_image, else Pillow); here, where no torch is imported.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")

Pair = tuple[Path, Path]

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Cityscapes' 19 training classes: (name, label id in *_gtFine_labelIds.png, colour), in train-id
# order, as cityscapesScripts' labels.py defines them.
CITYSCAPES_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)


@dataclass
class Layout:
    """A dataset's files as found: image/mask pairs per split, the classes the format itself
    defines (None: decided from a class table or the masks), and its ignore conventions."""

    name: str
    splits: dict[str, list[Pair]]
    problems: list[str] = field(default_factory=list)
    table: ClassTable | None = None
    ignore_unlisted: bool = False
    reduce_zero_label: bool = False


def split_name(name: str) -> str:
    """train2017 -> train, validation/valid -> val; anything else is kept."""
    lowered = name.lower()
    for prefix, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if lowered.startswith(prefix):
            return split
    return name


def ordered(splits: dict[str, list[Pair]]) -> dict[str, list[Pair]]:
    """train, val, test first, then the others by name."""

    def rank(name: str) -> tuple[int, str]:
        return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else 3, name)

    return {name: splits[name] for name in sorted(splits, key=rank)}


def _listing(folder: Path) -> list[Path]:
    # Hidden files (.DS_Store, ._foo from macOS archives) are never data.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def pair_folders(images_dir: Path, masks_dir: Path) -> tuple[list[Pair], list[str]]:
    """Pair `images_dir/*` with `masks_dir/*` by stem. Returns the pairs and one problem line per
    unpaired, duplicated or non-image file."""
    if not masks_dir.is_dir():
        return [], [f"{masks_dir}: missing; put the masks of {images_dir} there"]
    problems: list[str] = []
    by_stem: dict[str, dict[str, Path]] = {"image": {}, "mask": {}}
    for kind, folder in (("image", images_dir), ("mask", masks_dir)):
        for path in _listing(folder):
            name = str(path)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(
                    f"{name}: not an image file (supported: png, jpg, jpeg, bmp, tif, tiff, gif); "
                    "remove it from the dataset folder"
                )
            elif path.stem in by_stem[kind]:
                other = by_stem[kind][path.stem].name
                problems.append(f"{name}: same stem as {other}; keep one {kind} per stem")
            else:
                by_stem[kind][path.stem] = path
    images, masks = by_stem["image"], by_stem["mask"]
    for stem, path in images.items():
        if stem not in masks:
            problems.append(
                f"{path}: image without a mask (expected {masks_dir / stem}.png or another "
                "format); add the mask or remove the image"
            )
    for stem, path in masks.items():
        if stem not in images:
            problems.append(
                f"{path}: mask without an image (expected {images_dir / stem}.*); add the "
                "image or remove the mask"
            )
    if not images and not masks and not problems:
        problems.append(f"{images_dir}: empty; add images and masks or remove the folder")
    pairs = [(images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    return pairs, problems


# -- Pascal VOC -------------------------------------------------------------------------------
def _voc_root(root: Path) -> Path | None:
    """`root`, or the one VOC* folder of a VOCdevkit, when it holds the VOC segmentation files."""
    candidates = [root, *sorted(root.glob("VOC*"))]
    found = [
        path
        for path in candidates
        if (path / "ImageSets" / "Segmentation").is_dir() and (path / "SegmentationClass").is_dir()
    ]
    return found[0] if found and (found[0] == root or len(found) == 1) else None


def read_voc(root: Path) -> Layout:
    base = _voc_root(root)
    assert base is not None
    lists = base / "ImageSets" / "Segmentation"
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    # trainval is the union of train and val: reading it too would count images twice.
    for list_file in sorted(p for p in lists.glob("*.txt") if p.stem != "trainval"):
        pairs: list[Pair] = []
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            image_id = line.split()[0] if line.strip() else ""
            if not image_id:
                continue
            image = base / "JPEGImages" / f"{image_id}.jpg"
            mask = base / "SegmentationClass" / f"{image_id}.png"
            missing = [path for path in (image, mask) if not path.is_file()]
            if missing:
                problems.append(
                    f"{list_file}:{number}: '{image_id}' has no {missing[0]}; add the file or "
                    "remove the line"
                )
                continue
            pairs.append((image, mask))
        splits[list_file.stem] = pairs
    names = list(VOC_CLASSES)
    table = ClassTable(names, colors=default_palette(len(names)))
    return Layout("voc", ordered(splits), problems, table)


# -- Cityscapes -------------------------------------------------------------------------------
def _is_cityscapes(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def read_cityscapes(root: Path) -> Layout:
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split_dir in sorted(p for p in (root / "leftImg8bit").iterdir() if p.is_dir()):
        labels_dir = root / "gtFine" / split_dir.name
        if not labels_dir.is_dir():
            continue  # e.g. train_extra, which has only coarse labels
        pairs: list[Pair] = []
        for image in sorted(split_dir.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            mask = labels_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not mask.is_file():
                problems.append(
                    f"{image}: no labelIds partner ({mask}); add it or remove the image"
                )
                continue
            pairs.append((image, mask))
        splits[split_name(split_dir.name)] = pairs
    names = [name for name, _, _ in CITYSCAPES_CLASSES]
    table = ClassTable(
        names,
        values=[label_id for _, label_id, _ in CITYSCAPES_CLASSES],
        colors=[color for _, _, color in CITYSCAPES_CLASSES],
    )
    return Layout("cityscapes", ordered(splits), problems, table, ignore_unlisted=True)


# -- ADE20K -----------------------------------------------------------------------------------
def _is_ade20k(root: Path) -> bool:
    return (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir()


def _ade_names(root: Path) -> list[str] | None:
    """Short class names from objectInfo150.{txt,csv} (its Name column; 'wall', 'building' of
    'building, edifice' / 'building;edifice'), in class order."""
    for candidate in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / candidate
        if not path.is_file():
            continue
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        names = []
        for line in lines[1:]:
            columns = line.split("\t") if "\t" in line else line.split(",", 4)
            if len(columns) < 5:
                return None
            names.append(re.split(r"[;,]", columns[-1].strip().strip('"'))[0].strip())
        return names or None
    return None


def read_ade20k(root: Path) -> Layout:
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        pairs, split_problems = pair_folders(split_dir, root / "annotations" / split_dir.name)
        splits[split_name(split_dir.name)] = pairs
        problems.extend(split_problems)
    names = _ade_names(root)
    table = None
    if names:
        table = ClassTable(names, values=list(range(1, len(names) + 1)))
    return Layout("ade20k", ordered(splits), problems, table, reduce_zero_label=True)


# -- COCO -------------------------------------------------------------------------------------
def _coco_sources(root: Path) -> list[tuple[str, Path, Path]]:
    """(split, annotation file, image root) of every COCO split found."""
    found: list[tuple[str, Path, Path]] = []
    annotations = root / "annotations"
    if annotations.is_dir():
        for path in sorted(annotations.glob("instances_*.json")):
            tag = path.stem[len("instances_") :]
            for image_root in (root / tag, root / "images" / tag, root / "images", root):
                if image_root.is_dir():
                    found.append((split_name(tag), path, image_root))
                    break
    for path in sorted(root.glob("*/_annotations.coco.json")):
        found.append((split_name(path.parent.name), path, path.parent))
    return found


def read_coco(root: Path, cache: Path, class_names: Sequence[str] | None) -> Layout:
    from segcli.data.annotations import coco_class_names, rasterise_coco

    sources = _coco_sources(root)
    if not sources:
        raise UsageError(
            f"{root}: no COCO annotations (expected annotations/instances_SPLIT.json or "
            "SPLIT/_annotations.coco.json); check `data` and `format`"
        )
    if class_names is None:
        per_file = {path: coco_class_names(path) for _, path, _ in sources}
        class_names = max(per_file.values(), key=len)
        for path, names in per_file.items():
            if names != class_names[: len(names)]:
                raise UsageError(
                    f"{path}: its categories differ from the other splits'; use one category "
                    "list for every split"
                )
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split, path, image_root in sources:
        result = rasterise_coco(path, image_root, class_names, cache)
        splits.setdefault(split, []).extend(result.pairs)
        problems.extend(result.problems)
    return Layout("coco", ordered(splits), problems, ClassTable(list(class_names)))


# -- LabelMe ----------------------------------------------------------------------------------
def _labelme_folders(root: Path) -> dict[str, list[Path]]:
    from segcli.data.annotations import labelme_files

    folders = {
        split_name(child.name): files
        for child in sorted(p for p in root.iterdir() if p.is_dir())
        if (files := labelme_files(child))
    }
    if folders:
        return folders
    files = labelme_files(root)
    return {"train": files} if files else {}


def read_labelme(root: Path, cache: Path, class_names: Sequence[str] | None) -> Layout:
    from segcli.data.annotations import labelme_class_names, rasterise_labelme
    from segcli.data.classes import find_class_table, read_class_table

    folders = _labelme_folders(root)
    if not folders:
        raise UsageError(
            f"{root}: no LabelMe JSON files (in split folders or the root); check `data`"
        )
    table_path = find_class_table(root)
    if class_names is None and table_path is not None:
        class_names = read_class_table(table_path).names
    if class_names is None:
        class_names = labelme_class_names([f for files in folders.values() for f in files])
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split, files in folders.items():
        result = rasterise_labelme(files, class_names, cache)
        splits[split] = result.pairs
        problems.extend(result.problems)
    return Layout("labelme", ordered(splits), problems, ClassTable(list(class_names)))


# -- segcli's folders and a flat pair ---------------------------------------------------------
def folder_splits(root: Path) -> list[str]:
    """Split folders (those with an images/ folder): train, val, test first, then the others."""
    found = {p.name: [] for p in root.iterdir() if p.is_dir() and (p / "images").is_dir()}
    return list(ordered(found))


def read_folders(root: Path) -> Layout:
    splits: dict[str, list[Pair]] = {}
    problems: list[str] = []
    for split in folder_splits(root):
        splits[split], split_problems = pair_folders(
            root / split / "images", root / split / "masks"
        )
        problems.extend(split_problems)
    return Layout("folders", splits, problems)


def read_flat(root: Path) -> Layout:
    pairs, problems = pair_folders(root / "images", root / "masks")
    return Layout("flat", {"train": pairs}, problems)


def _is_flat(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


Detector = Callable[[Path], bool]
_DETECTORS: tuple[tuple[str, Detector], ...] = (
    ("voc", lambda root: _voc_root(root) is not None),
    ("cityscapes", _is_cityscapes),
    ("ade20k", _is_ade20k),
    ("coco", lambda root: bool(_coco_sources(root))),
    ("folders", lambda root: bool(folder_splits(root))),
    ("labelme", lambda root: bool(_labelme_folders(root))),
    ("flat", _is_flat),
)


def detect_format(root: Path) -> str | None:
    """The first layout whose files `root` holds, in the order of the module docstring."""
    for name, detector in _DETECTORS:
        if detector(root):
            return name
    return None


def read_layout(
    root: Path,
    data_format: str | None,
    cache: Path | None = None,
    class_names: Sequence[str] | None = None,
) -> Layout:
    """The dataset's files in its layout (`data_format`, else detected): pairs per split, the
    classes the format defines and its ignore conventions. Annotation formats (COCO, LabelMe)
    are rasterised into `cache` (default: the user cache) with `class_names` when given (a
    checkpoint's classes) so class indices match."""
    if data_format is not None:
        choose("`format`", data_format, ("auto", *FORMATS))
    if data_format in (None, "auto"):
        data_format = detect_format(root)
    if data_format is None:
        raise UsageError(
            f"{root}: no dataset layout found; expected train/images + train/masks (and val/), "
            "images/ + masks/, or a VOC, Cityscapes, ADE20K, COCO or LabelMe folder"
        )
    if cache is None:
        from segcli.device import cache_dir

        cache = cache_dir() / "masks"
    readers = {
        "folders": lambda: read_folders(root),
        "flat": lambda: read_flat(root),
        "voc": lambda: read_voc(root),
        "cityscapes": lambda: read_cityscapes(root),
        "ade20k": lambda: read_ade20k(root),
        "coco": lambda: read_coco(root, cache, class_names),
        "labelme": lambda: read_labelme(root, cache, class_names),
    }
    return readers[data_format]()
