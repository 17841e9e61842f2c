"""Polygon annotations as masks: COCO instances JSON and LabelMe JSON, rasterised once into
class-index PNGs in a cache, so the rest of segcli reads them as ordinary image/mask pairs.

Masks are 8-bit ('L') PNGs holding each pixel's class index: 0 (background) where nothing is
drawn, 255 (ignore) where LabelMe's ``__ignore__`` label is drawn. Classes are matched by
*name*, so COCO's category ids (1-based, often with gaps) never reach the masks.

Overlaps are resolved by painting order, later on top:

- COCO: annotations in decreasing area (the ``area`` field, else the polygons' own area), ties
  by annotation id, so a small object stays visible on a larger one it overlaps, whatever the
  order of the file. COCO has no ignore label: ``iscrowd`` regions (usually RLE) get their
  category like any other annotation. Compressed RLE needs pycocotools
  (``pip install 'segcli[coco]'``); uncompressed RLE is decoded here.
- LabelMe: shapes in file order, later shapes on top, as labelme's own labelme2voc paints them.
  Polygons, rectangles, circles and masks are painted; lines, line strips and points have no
  area, so they are skipped and make no class.

Polygons are drawn with Pillow, boundary pixels included. An annotation that cannot be drawn
(unknown class, no geometry) is left out and reported in `Rasterised.problems`, one line each,
so a caller can show every problem at once.

Masks live in ``CACHE/{coco,labelme}-KEY/``, KEY hashing `RASTERISER_VERSION`, the class names
and the JSON files, so editing an annotation or the classes makes a fresh set; a
``complete.json`` marker, written last, lets later runs reuse the masks without drawing them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from segcli.data.classes import IGNORE_INDEX
from segcli.data.layouts import IMAGE_EXTENSIONS
from segcli.errors import UsageError, first_line
from segcli.files import atomic_write_bytes

# Bump whenever this module would draw different masks from the same JSON: old caches then miss.
RASTERISER_VERSION = 1
MARKER = "complete.json"
# Class indices 0..254; 255 is ignore.
MAX_CLASSES = IGNORE_INDEX
LABELME_IGNORE = "__ignore__"
LABELME_BACKGROUND = "_background_"
_NO_AREA_SHAPES = frozenset({"line", "linestrip", "point", "points"})
_DRAWN_SHAPES = frozenset({"polygon", "rectangle", "circle", "mask"})
_COCO_INSTALL = "install pycocotools (pip install 'segcli[coco]')"
_NEEDS_PYCOCOTOOLS = "needs pycocotools"  # _coco_geometry's answer for compressed RLE without it

Pair = tuple[Path, Path]  # (image path, mask path)


@dataclass
class Rasterised:
    """Image/mask pairs made from one annotation source, and what kept some annotations or
    images out."""

    pairs: list[Pair]  # sorted by image stem; mask = rasterised PNG in the cache
    problems: list[str]  # one line each, naming the JSON file and what to do


@dataclass
class _Shape:
    """One thing to paint. `kind`: polygon (data: points), rectangle and ellipse (data: box),
    rle (data: (height, width, counts)), bitmap (data: (x, y, base64 PNG))."""

    value: int
    kind: str
    data: Any
    what: str  # "annotation 7", "shape 3 ('cat')": how problem lines name it


@dataclass
class _Job:
    """One mask to draw."""

    source: Path  # the JSON file
    image: Path
    stem: str
    alias: str  # the mask's name when another image has the same stem
    missing: str  # the problem line if the image is not on disk
    size: tuple[int, int] | None  # (width, height) from the JSON
    shapes: list[_Shape] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------
def _read_json(path: Path) -> tuple[Any, bytes]:
    try:
        raw = path.read_bytes()
        return json.loads(raw), raw
    except (OSError, ValueError, RecursionError) as error:
        raise UsageError(
            f"{path}: not a readable JSON file ({first_line(error)}); fix or replace it"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> int | None:
    if not _is_number(value) or value != int(value) or value <= 0:
        return None
    return int(value)


def _json_size(width: Any, height: Any) -> tuple[int, int] | None:
    w, h = _positive_int(width), _positive_int(height)
    return (w, h) if w is not None and h is not None else None


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header only: no pixels are decoded."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise UsageError(
            f"{path}: not a readable image ({first_line(error)}); replace or remove the file"
        ) from None


def _class_lookup(class_names: Sequence[str], source: Path) -> dict[str, int]:
    if len(class_names) > MAX_CLASSES:
        raise UsageError(
            f"{source}: {len(class_names)} classes, but masks hold at most {MAX_CLASSES} "
            f"(255 is ignore); merge or drop classes"
        )
    lookup: dict[str, int] = {}
    for index, name in enumerate(class_names):
        lookup.setdefault(name, index)
    return lookup


@functools.cache
def _coco_mask() -> ModuleType | None:
    """pycocotools.mask, or None when it is not installed."""
    try:
        from pycocotools import mask  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mask


# -- COCO -------------------------------------------------------------------------------------
def _coco_categories(path: Path, data: Any) -> dict[int, str]:
    """Category id -> name; UsageError if `data` is not a COCO instances file."""
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise UsageError(
            f"{path}: not a COCO instances file (needs 'images', 'annotations' and "
            "'categories' lists); check `format` or the file"
        )
    categories: dict[int, str] = {}
    for position, category in enumerate(data["categories"]):
        if (
            not isinstance(category, dict)
            or not isinstance(category.get("id"), int)
            or isinstance(category.get("id"), bool)
            or not isinstance(category.get("name"), str)
        ):
            raise UsageError(
                f"{path}: category {position} needs an integer 'id' and a 'name'; fix the entry"
            )
        categories.setdefault(category["id"], category["name"])
    return categories


def coco_class_names(annotation_file: Path) -> list[str]:
    """["background", *category names ordered by category id]. Raises UsageError (one line
    naming the file) if not a COCO instances file (needs 'images', 'annotations',
    'categories'). Classes are matched by name, so a name used twice (or a category called
    "background") is one class."""
    data, _ = _read_json(annotation_file)
    categories = _coco_categories(annotation_file, data)
    names = ["background"]
    for _, name in sorted(categories.items()):
        if name not in names:
            names.append(name)
    return names


def _polygon_points(polygon: Any) -> list[tuple[float, float]] | None:
    """A flat [x1, y1, x2, y2, ...] list as points; None unless it has 3 points or more."""
    if (
        not isinstance(polygon, list)
        or len(polygon) < 6
        or len(polygon) % 2
        or not all(_is_number(v) for v in polygon)
    ):
        return None
    return list(zip(polygon[0::2], polygon[1::2], strict=True))


def _polygon_area(points: list[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _unusable(problem: str) -> tuple[list[_Shape], float, str]:
    return [], 0.0, problem


def _coco_geometry(segmentation: Any, value: int, what: str) -> tuple[list[_Shape], float, str]:
    """The shapes of one annotation, their area, and a problem ('' if none)."""
    if isinstance(segmentation, dict) and segmentation:
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and v >= 0 for v in size)
        ):
            return _unusable("has an RLE without a [height, width] 'size'; fix or remove it")
        height, width = size
        if isinstance(counts, str):
            coco_mask = _coco_mask()
            if coco_mask is None:
                return _unusable(_NEEDS_PYCOCOTOOLS)
            rle = {"size": [height, width], "counts": counts}
            try:
                area = float(coco_mask.area(rle))
            except Exception as error:  # pycocotools raises bare Exceptions on bad strings
                return _unusable(f"has an unreadable RLE ({first_line(error)}); fix or remove it")
            return [_Shape(value, "rle", (height, width, counts), what)], area, ""
        if (
            not isinstance(counts, list)
            or not all(isinstance(v, int) and v >= 0 for v in counts)
            or sum(counts) != height * width
        ):
            return _unusable(
                f"has an RLE whose 'counts' do not add up to its {height}x{width} size; fix or "
                "remove it"
            )
        area = float(sum(counts[1::2]))
        return [_Shape(value, "rle", (height, width, counts), what)], area, ""
    if isinstance(segmentation, list) and segmentation:
        if all(_is_number(v) for v in segmentation):
            segmentation = [segmentation]  # one flat polygon, not wrapped in a list
        # Polygons of fewer than 3 points (some exports write them) enclose nothing: drop them.
        polygons = [p for p in map(_polygon_points, segmentation) if p is not None]
        if not polygons:
            return _unusable(
                "has no polygon of 3 or more points in 'segmentation'; fix or remove it"
            )
        area = sum(_polygon_area(points) for points in polygons)
        return [_Shape(value, "polygon", points, what) for points in polygons], area, ""
    return _unusable(
        "has no 'segmentation' (a box alone makes no mask); add a polygon or remove it"
    )


def rasterise_coco(
    annotation_file: Path, image_root: Path, class_names: Sequence[str], cache_root: Path
) -> Rasterised:
    """Masks for every image of a COCO instances file (an image without annotations is all
    background). Image i's file is image_root / images[i]['file_name']. Category -> class index
    by category *name* in class_names (index 0 = background, so unannotated pixels are 0)."""
    lookup = _class_lookup(class_names, annotation_file)
    try:
        data, raw = _read_json(annotation_file)
        categories = _coco_categories(annotation_file, data)
    except UsageError as error:
        return Rasterised([], [str(error)])
    digest = _new_key(class_names)
    _add_source(digest, annotation_file, raw)
    problems: list[str] = []
    jobs: dict[int | str, _Job] = {}
    for position, entry in enumerate(data["images"]):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(image_id, (int, str)) or not isinstance(file_name, str) or not file_name:
            problems.append(
                f"{annotation_file}: image entry {position} needs an 'id' and a 'file_name'; "
                "fix the entry"
            )
            continue
        if image_id in jobs:
            problems.append(
                f"{annotation_file}: image id {image_id} is listed twice; keep one entry per image"
            )
            continue
        name = file_name.replace("\\", "/")
        image = image_root / name
        jobs[image_id] = _Job(
            source=annotation_file,
            image=image,
            stem=Path(name).stem,
            alias=name[: len(name) - len(Path(name).suffix)].replace("/", "__"),
            missing=(
                f"{annotation_file}: image {file_name!r} (id {image_id}) is missing: {image}; "
                "put it there or remove its entry"
            ),
            size=_json_size(entry.get("width"), entry.get("height")),
        )
    # Painting order per image: (-area, annotation id, position in the file) and the shapes.
    painted: dict[int | str, list[tuple[float, float, int, list[_Shape]]]] = {}
    unknown: dict[str, list[str]] = {}
    needs_pycocotools: list[str] = []
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            problems.append(
                f"{annotation_file}: annotation entry {position} is not an object; fix or remove it"
            )
            continue
        annotation_id = annotation.get("id")
        label = f"annotation {annotation_id if annotation_id is not None else f'#{position}'}"
        image_id = annotation.get("image_id")
        if not isinstance(image_id, (int, str)) or image_id not in jobs:
            problems.append(
                f"{annotation_file}: {label} refers to image id {image_id!r}, which 'images' "
                "does not list; fix its image_id or remove it"
            )
            continue
        category_id = annotation.get("category_id")
        category = categories.get(category_id) if isinstance(category_id, int) else None
        if category is None:
            problems.append(
                f"{annotation_file}: {label} has category id {category_id!r}, which "
                "'categories' does not list; fix its category_id or remove it"
            )
            continue
        value = lookup.get(category)
        if value is None:
            unknown.setdefault(category, []).append(label)
            continue
        shapes, area, problem = _coco_geometry(annotation.get("segmentation"), value, label)
        if problem == _NEEDS_PYCOCOTOOLS:
            needs_pycocotools.append(label)
            continue
        if problem:
            problems.append(f"{annotation_file}: {label} {problem}")
            continue
        if _is_number(annotation.get("area")):
            area = float(annotation["area"])
        order = annotation_id if _is_number(annotation_id) else math.inf
        painted.setdefault(image_id, []).append((-area, order, position, shapes))
    if needs_pycocotools:
        # Masks drawn without these annotations must not be reused once pycocotools is there.
        digest.update(b"without compressed RLE\n")
        more = f" ({len(needs_pycocotools) - 1} more are too)" if len(needs_pycocotools) > 1 else ""
        problems.append(
            f"{annotation_file}: {needs_pycocotools[0]} is compressed RLE{more}; {_COCO_INSTALL}"
        )
    for category, labels in unknown.items():
        more = f" (and {len(labels) - 1} more)" if len(labels) > 1 else ""
        problems.append(
            f"{annotation_file}: {labels[0]}{more} has category {category!r}, which is not one "
            "of the classes; add it to the class table or remove its annotations"
        )
    for image_id, entries in painted.items():
        entries.sort(key=lambda entry: entry[:3])
        jobs[image_id].shapes = [shape for *_, shapes in entries for shape in shapes]
    return _rasterise("coco", digest, class_names, cache_root, list(jobs.values()), problems)


# -- LabelMe ----------------------------------------------------------------------------------
def _labelme_data(path: Path) -> dict[str, Any] | None:
    """The file's content if it is a LabelMe file, None if it is another JSON; UsageError if it
    cannot be read."""
    data, _ = _read_json(path)
    return data if isinstance(data, dict) and isinstance(data.get("shapes"), list) else None


def labelme_files(folder: Path) -> list[Path]:
    """The LabelMe JSON files (dicts with a 'shapes' list) directly in folder, sorted.
    Unreadable JSON files are left out: nothing marks them as LabelMe's."""
    found: list[Path] = []
    for path in sorted(folder.glob("*.json")):
        try:
            if path.is_file() and _labelme_data(path) is not None:
                found.append(path)
        except UsageError:
            continue
    return found


def _shape_type(shape: dict[str, Any]) -> str:
    kind = shape.get("shape_type")
    return kind if isinstance(kind, str) and kind else "polygon"


def labelme_class_names(files: Sequence[Path]) -> list[str]:
    """["background", *sorted unique labels] over all files; a label '__ignore__' is not a
    class; '_background_' (labelme's own name) is the background class, not a second class.
    Labels found only on lines and points (which are not painted) make no class."""
    labels: set[str] = set()
    for path in files:
        try:
            data = _labelme_data(path)
        except UsageError:
            continue  # rasterise_labelme reports it
        for shape in data["shapes"] if data is not None else []:
            if not isinstance(shape, dict) or _shape_type(shape) in _NO_AREA_SHAPES:
                continue
            label = shape.get("label")
            if isinstance(label, str) and label not in (LABELME_IGNORE, LABELME_BACKGROUND):
                labels.add(label)
    labels.discard("background")
    return ["background", *sorted(labels)]


def _labelme_image(path: Path, data: dict[str, Any]) -> Path | None:
    image_path = data.get("imagePath")
    if isinstance(image_path, str) and image_path:
        # labelme on Windows writes backslashes.
        candidate = path.parent / image_path.replace("\\", "/")
        if candidate.is_file():
            return candidate
    for suffix in IMAGE_EXTENSIONS:
        for variant in (suffix, suffix.upper()):
            candidate = path.with_suffix(variant)
            if candidate.is_file():
                return candidate
    return None


def _points(value: Any) -> list[tuple[float, float]] | None:
    if not isinstance(value, list):
        return None
    points: list[tuple[float, float]] = []
    for point in value:
        if not isinstance(point, list) or len(point) != 2 or not all(map(_is_number, point)):
            return None
        points.append((point[0], point[1]))
    return points


def _labelme_shape(shape: dict[str, Any], value: int, what: str) -> _Shape | str:
    """The shape to paint, or what is wrong with it."""
    kind = _shape_type(shape)
    points = _points(shape.get("points"))
    if kind == "polygon":
        if points is None or len(points) < 3:
            return "is a polygon with fewer than 3 points; fix or delete it"
        return _Shape(value, "polygon", points, what)
    if points is None or len(points) != 2:
        return f"is a {kind} that needs 2 points; fix or delete it"
    (x0, y0), (x1, y1) = points
    if kind == "rectangle":
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        return _Shape(value, "rectangle", box, what)
    if kind == "circle":
        radius = math.hypot(x1 - x0, y1 - y0)
        return _Shape(value, "ellipse", (x0 - radius, y0 - radius, x0 + radius, y0 + radius), what)
    # kind == "mask": a base64 PNG whose top-left pixel sits at the first point (labelme's
    # shapes_to_label does the same).
    encoded = shape.get("mask")
    if not isinstance(encoded, str) or not encoded:
        return "is a mask shape without its 'mask' image; fix or delete it"
    return _Shape(value, "bitmap", (int(min(x0, x1)), int(min(y0, y1)), encoded), what)


def rasterise_labelme(
    files: Sequence[Path], class_names: Sequence[str], cache_root: Path
) -> Rasterised:
    """Masks for LabelMe files. The image of each JSON = its 'imagePath' resolved relative to
    the JSON's folder (else a file with the JSON's stem and an image suffix beside it)."""
    lookup = _class_lookup(class_names, files[0].parent if files else Path("."))
    lookup.setdefault(LABELME_BACKGROUND, 0)
    lookup[LABELME_IGNORE] = IGNORE_INDEX
    digest = _new_key(class_names)
    problems: list[str] = []
    jobs: list[_Job] = []
    unknown: dict[str, list[Path]] = {}
    for path in files:
        try:
            data, raw = _read_json(path)
        except UsageError as error:
            problems.append(str(error))
            continue
        _add_source(digest, path, raw)
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            problems.append(f"{path}: not a LabelMe file (no 'shapes' list); fix or remove it")
            continue
        image = _labelme_image(path, data)
        if image is None:
            problems.append(
                f"{path}: its image {data.get('imagePath')!r} is missing; put the image beside "
                "the JSON or fix 'imagePath'"
            )
            continue
        job = _Job(
            source=path,
            image=image,
            stem=image.stem,
            alias=path.stem,
            missing=f"{path}: its image {image} is missing; put it back or fix 'imagePath'",
            size=_json_size(data.get("imageWidth"), data.get("imageHeight")),
        )
        for number, shape in enumerate(data["shapes"], 1):
            if not isinstance(shape, dict):
                problems.append(f"{path}: shape {number} is not an object; fix or delete it")
                continue
            kind = _shape_type(shape)
            if kind in _NO_AREA_SHAPES:
                continue
            label = shape.get("label")
            what = f"shape {number} ({label!r})"
            if not isinstance(label, str):
                problems.append(f"{path}: shape {number} has no 'label'; label it or delete it")
                continue
            if kind not in _DRAWN_SHAPES:
                problems.append(
                    f"{path}: {what} has shape_type {kind!r}, which segcli cannot paint; use a "
                    "polygon, rectangle, circle or mask"
                )
                continue
            value = lookup.get(label)
            if value is None:
                unknown.setdefault(label, []).append(path)
                continue
            result = _labelme_shape(shape, value, what)
            if isinstance(result, str):
                problems.append(f"{path}: {what} {result}")
            else:
                job.shapes.append(result)
        jobs.append(job)
    for label, paths in unknown.items():
        others = len(set(paths)) - 1
        more = f" (and in {others} other files)" if others > 0 else ""
        problems.append(
            f"{paths[0]}: label {label!r}{more} is not one of the classes; add it to the class "
            "table or fix the label"
        )
    return _rasterise("labelme", digest, class_names, cache_root, jobs, problems)


# -- drawing and the cache --------------------------------------------------------------------
def _new_key(class_names: Sequence[str]) -> Any:
    digest = hashlib.sha256()
    digest.update(f"segcli-annotations {RASTERISER_VERSION}\n".encode())
    digest.update(json.dumps(list(class_names)).encode() + b"\n")
    return digest


def _add_source(digest: Any, path: Path, raw: bytes) -> None:
    # The file's name is hashed too: LabelMe falls back to it to find the image.
    digest.update(f"{path.name}\n{len(raw)}\n".encode())
    digest.update(raw)


def _mask_names(jobs: Sequence[_Job]) -> list[str]:
    """A mask is named after its image's stem; images sharing a stem (COCO file_names in
    sub-folders: a/1.jpg and b/1.jpg) are named after their path instead (a__1, b__1), so no
    mask overwrites another. Stems are compared case-blind, as macOS and Windows do."""
    stems = Counter(job.stem.lower() for job in jobs)
    used: set[str] = set()
    names: list[str] = []
    for job in jobs:
        name = job.stem if stems[job.stem.lower()] == 1 else job.alias
        candidate, number = name, 1
        while candidate.lower() in used:  # the same image listed twice, or a.jpg beside a.png
            candidate, number = f"{name}-{number}", number + 1
        used.add(candidate.lower())
        names.append(candidate)
    return names


def _decode_rle(height: int, width: int, counts: list[int] | str) -> np.ndarray:
    if isinstance(counts, str):
        coco_mask = _coco_mask()
        assert coco_mask is not None  # such shapes are only kept when it is installed
        return coco_mask.decode({"size": [height, width], "counts": counts}).astype(bool)
    # Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order.
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")


def _paint(canvas: Image.Image, draw: ImageDraw.ImageDraw, shape: _Shape) -> str:
    """Paint one shape; return what went wrong ('' if nothing)."""
    value = shape.value
    if shape.kind == "polygon":
        draw.polygon(shape.data, fill=value, outline=value)
    elif shape.kind == "rectangle":
        draw.rectangle(shape.data, fill=value, outline=value)
    elif shape.kind == "ellipse":
        draw.ellipse(shape.data, fill=value, outline=value)
    elif shape.kind == "rle":
        height, width, counts = shape.data
        if (width, height) != canvas.size:
            return (
                f"has an RLE of {height}x{width} pixels on a {canvas.height}x{canvas.width} "
                "image; fix its 'size' or the image's"
            )
        try:
            bits = _decode_rle(height, width, counts)
        except Exception as error:  # pycocotools raises bare Exceptions on bad strings
            return f"has an unreadable RLE ({first_line(error)}); fix or remove it"
        canvas.paste(value, (0, 0), Image.fromarray(bits.astype(np.uint8) * 255))
    else:
        x, y, encoded = shape.data
        try:
            with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
                bits = np.asarray(image.convert("L")) > 0
        except (OSError, UnidentifiedImageError, ValueError, binascii.Error) as error:
            return f"has an unreadable 'mask' image ({first_line(error)}); redraw it"
        canvas.paste(value, (x, y), Image.fromarray(bits.astype(np.uint8) * 255))
    return ""


def _draw(job: _Job) -> tuple[bytes, list[str]]:
    """The mask PNG and the problems of shapes that could not be painted (without the file)."""
    size = job.size if job.size is not None else _header_size(job.image)
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    problems = [
        f"{shape.what} {error}" for shape in job.shapes if (error := _paint(canvas, draw, shape))
    ]
    buffer = io.BytesIO()
    # Encoding is most of the time spent here; zlib level 1 is ~3x faster than Pillow's 6 for
    # masks ~40% larger, a good trade for a cache.
    canvas.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), problems


def _read_marker(path: Path) -> dict[str, list[str]] | None:
    """The drawing problems stored with complete masks, per mask; None if the set is not
    complete (the marker is missing or damaged)."""
    try:
        marker = json.loads(path.read_bytes())
        stored = marker["problems"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(stored, dict) or not all(
        isinstance(lines, list) and all(isinstance(line, str) for line in lines)
        for lines in stored.values()
    ):
        return None
    return stored


def _rasterise(
    kind: str,
    digest: Any,
    class_names: Sequence[str],
    cache_root: Path,
    jobs: Sequence[_Job],
    problems: list[str],
) -> Rasterised:
    folder = cache_root / f"{kind}-{digest.hexdigest()[:16]}"
    marker = folder / MARKER
    stored = _read_marker(marker)
    # Problems found while drawing are kept in the marker so a reused set reports them again;
    # stored without the JSON's path, which may have moved since.
    drawn_problems = dict(stored) if stored is not None else {}
    wrote = False
    pairs: list[Pair] = []
    for job, name in zip(jobs, _mask_names(jobs), strict=True):
        if not job.image.is_file():
            problems.append(job.missing)
            continue
        mask = folder / f"{name}.png"
        # A complete set may still lack a mask whose image was missing when it was made.
        if stored is None or not mask.is_file():
            try:
                png, lines = _draw(job)
            except UsageError as error:
                problems.append(str(error))
                continue
            atomic_write_bytes(mask, png)
            wrote = True
            drawn_problems[name] = lines
        problems.extend(f"{job.source}: {line}" for line in drawn_problems.get(name, []))
        pairs.append((job.image, mask))
    if stored is None or wrote:
        content = {
            "version": RASTERISER_VERSION,
            "classes": list(class_names),
            "problems": {name: lines for name, lines in drawn_problems.items() if lines},
        }
        atomic_write_bytes(marker, json.dumps(content, indent=1).encode())
    pairs.sort(key=lambda pair: (pair[0].stem, str(pair[0])))
    return Rasterised(pairs, problems)
