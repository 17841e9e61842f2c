"""COCO and LabelMe polygon annotations rasterised to class-index masks, cached on disk."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

import segcli.data.annotations as rasteriser
from segcli.data.annotations import (
    coco_class_names,
    labelme_class_names,
    labelme_files,
    rasterise_coco,
    rasterise_labelme,
)
from segcli.errors import UsageError

HEIGHT, WIDTH = 20, 30


def _image(path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 30)).save(path)
    return path


def _box(x0: int, y0: int, x1: int, y1: int) -> list[int]:
    """A COCO rectangle polygon, corners clockwise from the top left."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _coco(
    path: Path,
    annotations: list[dict[str, Any]],
    *,
    images: list[dict[str, Any]] | None = None,
    categories: list[dict[str, Any]] | None = None,
) -> Path:
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}]
    if categories is None:
        # Non-contiguous ids, listed out of order: classes must follow the ids' order.
        categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def _ann(id_: int, category: int, segmentation: Any, image: int = 1) -> dict[str, Any]:
    return {"id": id_, "image_id": image, "category_id": category, "segmentation": segmentation}


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.array(image)


def _single_mask(result: rasteriser.Rasterised) -> np.ndarray:
    assert result.problems == []
    assert len(result.pairs) == 1
    return _mask(result.pairs[0][1])


# -- COCO -------------------------------------------------------------------------------------
def test_coco_polygon_paints_exact_pixels_of_the_class_named_by_its_category(tmp_path):
    # Catches category ids used as class indices, classes not ordered by id, and an off-by-one
    # at the polygon's boundary (Pillow paints the boundary pixels too).
    _image(tmp_path / "a.png")
    json_path = _coco(tmp_path / "instances.json", [_ann(1, 7, [_box(5, 4, 12, 9)])])
    names = coco_class_names(json_path)
    assert names == ["background", "cat", "dog"]

    mask = _single_mask(rasterise_coco(json_path, tmp_path, names, tmp_path / "cache"))

    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[4:10, 5:13] = 2  # rows y0..y1 and columns x0..x1, both ends included
    np.testing.assert_array_equal(mask, expected)
    # Worked by hand: the corners are in, one pixel past them is out, 6 rows x 8 columns.
    assert mask[4, 5] == mask[9, 12] == 2
    assert mask[3, 5] == mask[4, 4] == mask[10, 12] == mask[9, 13] == 0
    assert int((mask == 2).sum()) == 48


@pytest.mark.parametrize("small_first", [False, True])
def test_coco_smaller_object_ends_on_top_whatever_the_file_order(tmp_path, small_first):
    # Catches painting in file order, which hides a small object under a large one.
    _image(tmp_path / "a.png")
    big = _ann(1, 3, [_box(2, 2, 25, 17)])
    small = _ann(2, 7, [_box(10, 6, 14, 9)])
    order = [small, big] if small_first else [big, small]
    json_path = _coco(tmp_path / "instances.json", order)

    names = ["background", "cat", "dog"]
    mask = _single_mask(rasterise_coco(json_path, tmp_path, names, tmp_path / "cache"))

    assert (mask[6:10, 10:15] == 2).all()
    assert int((mask == 2).sum()) == 4 * 5
    assert int((mask == 1).sum()) == 16 * 24 - 4 * 5


def test_coco_uncompressed_rle_is_read_column_major(tmp_path):
    # Catches reading RLE runs row by row (COCO's are column by column).
    _image(tmp_path / "a.png", width=4, height=3)
    images = [{"id": 1, "file_name": "a.png", "height": 3, "width": 4}]
    rle = {"size": [3, 4], "counts": [1, 2, 3, 6]}  # 1 zero, 2 ones, 3 zeros, 6 ones
    json_path = _coco(tmp_path / "instances.json", [_ann(1, 3, rle)], images=images)

    names = ["background", "cat", "dog"]
    mask = _single_mask(rasterise_coco(json_path, tmp_path, names, tmp_path / "cache"))

    expected = np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(mask, expected)


def test_coco_compressed_rle_matches_pycocotools(tmp_path):
    # Catches a wrong hand-off to pycocotools (counts type, size order, transposed result).
    mask_utils = pytest.importorskip("pycocotools.mask")
    _image(tmp_path / "a.png")
    bits = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    bits[3:15, 4:9] = 1
    bits[10:18, 20:28] = 1
    rle = mask_utils.encode(np.asfortranarray(bits))
    segmentation = {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}
    json_path = _coco(tmp_path / "instances.json", [_ann(1, 7, segmentation)])

    names = ["background", "cat", "dog"]
    mask = _single_mask(rasterise_coco(json_path, tmp_path, names, tmp_path / "cache"))

    np.testing.assert_array_equal(mask, mask_utils.decode(rle).astype(np.uint8) * 2)


def test_coco_compressed_rle_without_pycocotools_is_one_problem(tmp_path, monkeypatch):
    # Catches a traceback (or one line per crowd annotation) when pycocotools is missing, and
    # masks cached without the RLE objects being reused after it is installed.
    monkeypatch.setattr(rasteriser, "_coco_mask", lambda: None)
    _image(tmp_path / "a.png")
    rle = {"size": [HEIGHT, WIDTH], "counts": "PXb08i0"}
    json_path = _coco(tmp_path / "instances.json", [_ann(4, 3, rle), _ann(5, 3, rle)])

    result = rasterise_coco(json_path, tmp_path, ["background", "cat", "dog"], tmp_path / "c")

    assert len(result.problems) == 1
    assert str(json_path) in result.problems[0]
    assert "annotation 4" in result.problems[0]
    assert "pip install 'segcli[coco]'" in result.problems[0]

    # Once pycocotools is installed the masks are drawn afresh, not reused without the objects.
    everywhere = np.ones((HEIGHT, WIDTH), dtype=np.uint8)
    fake = SimpleNamespace(area=lambda rle: everywhere.sum(), decode=lambda rle: everywhere)
    monkeypatch.setattr(rasteriser, "_coco_mask", lambda: fake)
    again = rasterise_coco(json_path, tmp_path, ["background", "cat", "dog"], tmp_path / "c")
    assert again.problems == []
    assert again.pairs[0][1] != result.pairs[0][1]
    assert (_mask(again.pairs[0][1]) == 1).all()


def test_coco_masks_are_reused_and_the_key_follows_the_json(tmp_path):
    # Catches re-drawing every mask on every run, and reusing stale masks after an edit.
    _image(tmp_path / "a.png")
    json_path = _coco(tmp_path / "instances.json", [_ann(1, 3, [_box(5, 4, 12, 9)])])
    names = ["background", "cat", "dog"]
    cache = tmp_path / "cache"

    first = rasterise_coco(json_path, tmp_path, names, cache).pairs[0][1]
    before = first.stat()
    assert (first.parent / "complete.json").is_file()
    second = rasterise_coco(json_path, tmp_path, names, cache).pairs[0][1]
    after = second.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    _coco(json_path, [_ann(1, 3, [_box(0, 0, 3, 3)])])
    edited = rasterise_coco(json_path, tmp_path, names, cache).pairs[0][1]
    assert edited.parent != first.parent
    assert _mask(edited)[0, 0] == 1 and _mask(edited)[5, 5] == 0


def test_coco_problems_are_one_line_each_naming_the_file(tmp_path):
    # Catches a crash on the first bad annotation, and problems that do not say where they are.
    _image(tmp_path / "a.png")
    _image(tmp_path / "empty.png")
    images = [
        {"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
        {"id": 2, "file_name": "gone.png", "height": HEIGHT, "width": WIDTH},
        {"id": 3, "file_name": "empty.png"},  # no annotations, no size: read from the image
    ]
    json_path = _coco(
        tmp_path / "instances.json",
        [
            _ann(1, 3, [_box(1, 1, 4, 4)]),
            _ann(2, 3, [_box(1, 1, 4, 4)], image=99),
            _ann(3, 3, []),
            _ann(4, 7, [_box(1, 1, 4, 4)]),  # dog: not among the classes given
        ],
        images=images,
    )

    result = rasterise_coco(json_path, tmp_path, ["background", "cat"], tmp_path / "cache")

    assert len(result.problems) == 4
    for line in result.problems:
        assert str(json_path) in line and "\n" not in line
    joined = "\n".join(result.problems)
    for expected in ("annotation 2 refers to image id 99", "annotation 3 has no", "'dog'"):
        assert expected in joined
    assert "gone.png" in joined
    assert [image.name for image, _ in result.pairs] == ["a.png", "empty.png"]
    empty = _mask(result.pairs[1][1])
    assert empty.shape == (HEIGHT, WIDTH) and not empty.any()


def test_coco_images_sharing_a_stem_get_separate_masks(tmp_path):
    # Catches sub-folder images with the same stem overwriting each other's mask.
    _image(tmp_path / "x" / "1.png")
    _image(tmp_path / "y" / "1.png")
    images = [
        {"id": 1, "file_name": "x/1.png", "height": HEIGHT, "width": WIDTH},
        {"id": 2, "file_name": "y/1.png", "height": HEIGHT, "width": WIDTH},
    ]
    json_path = _coco(
        tmp_path / "instances.json", [_ann(1, 3, [_box(0, 0, 3, 3)], image=1)], images=images
    )

    result = rasterise_coco(json_path, tmp_path, ["background", "cat"], tmp_path / "cache")

    masks = {image.parent.name: mask for image, mask in result.pairs}
    assert masks["x"] != masks["y"]
    assert _mask(masks["x"]).any() and not _mask(masks["y"]).any()


def test_coco_class_names_refuses_other_files_in_one_line(tmp_path):
    # Catches a KeyError traceback on a LabelMe or broken file passed as COCO.
    other = tmp_path / "labelme.json"
    other.write_text(json.dumps({"shapes": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for path in (other, broken):
        with pytest.raises(UsageError) as error:
            coco_class_names(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_more_than_255_classes_is_refused(tmp_path):
    # Catches class 255 silently becoming "ignore" (or wrapping past uint8).
    json_path = _coco(tmp_path / "instances.json", [])
    names = ["background", *(f"c{i}" for i in range(255))]
    with pytest.raises(UsageError, match="255"):
        rasterise_coco(json_path, tmp_path, names, tmp_path / "cache")


# -- LabelMe ----------------------------------------------------------------------------------
def _labelme(path: Path, shapes: list[dict[str, Any]], image: str | None, **extra: Any) -> Path:
    data = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image, **extra}
    data.setdefault("imageHeight", HEIGHT)
    data.setdefault("imageWidth", WIDTH)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return path


def _shape(label: str, points: list[list[float]], kind: str = "polygon") -> dict[str, Any]:
    return {"label": label, "points": points, "shape_type": kind, "group_id": None}


def test_labelme_polygon_rectangle_circle_and_ignore(tmp_path):
    # Catches unsupported shape types, rectangles given corner-last, circles drawn with the
    # wrong radius, __ignore__ becoming a class, and lines painted as areas.
    _image(tmp_path / "pic.png")
    bitmap = io.BytesIO()
    Image.fromarray(np.full((2, 3), 255, dtype=np.uint8)).save(bitmap, format="PNG")
    shapes = [
        _shape("_background_", [[0, 0], [29, 0], [29, 19], [0, 19]]),
        _shape("cat", [[1, 1], [6, 1], [6, 5], [1, 5]]),
        _shape("dog", [[14, 8], [9, 2]], "rectangle"),  # bottom-right corner first
        _shape("cat", [[22, 10], [22, 13]], "circle"),  # centre, then a point 3 px away
        _shape("__ignore__", [[1, 15], [4, 15], [4, 18], [1, 18]]),
        _shape("cable", [[0, 12], [29, 12]], "line"),
        _shape("cable", [[8, 17]], "point"),
        {
            **_shape("dog", [[10, 15], [12, 16]], "mask"),
            "mask": base64.b64encode(bitmap.getvalue()).decode(),
        },
    ]
    json_path = _labelme(tmp_path / "pic.json", shapes, "pic.png")

    assert labelme_files(tmp_path) == [json_path]
    names = labelme_class_names([json_path])
    assert names == ["background", "cat", "dog"]  # no _background_, __ignore__ or cable
    mask = _single_mask(rasterise_labelme([json_path], names, tmp_path / "cache"))

    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[1:6, 1:7] = 1
    expected[2:9, 9:15] = 2
    expected[15:19, 1:5] = 255
    expected[15:17, 10:13] = 2
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    # Pillow's disc: the pixels whose centres lie within the radius plus half a pixel.
    expected[(columns - 22) ** 2 + (rows - 10) ** 2 <= 3.5**2] = 1
    np.testing.assert_array_equal(mask, expected)
    # The circle of radius 3 around (x 22, y 10), by hand: 3 px out is in, so is (+1, +3)
    # (3.16 px), (+2, +3) (3.6 px) is not, nor is 4 px out.
    assert mask[10, 22] == mask[10, 19] == mask[7, 22] == mask[13, 22] == mask[13, 23] == 1
    assert mask[13, 24] == mask[10, 18] == mask[10, 26] == mask[6, 22] == mask[14, 22] == 0
    assert mask[12, 0] == 0  # the line left no trace


@pytest.mark.parametrize("small_first", [False, True])
def test_labelme_later_shapes_are_painted_on_top(tmp_path, small_first):
    # Catches any order but labelme's own (file order, last on top).
    _image(tmp_path / "pic.png")
    big = _shape("cat", [[2, 2], [25, 17]], "rectangle")
    small = _shape("dog", [[10, 6], [14, 9]], "rectangle")
    json_path = _labelme(
        tmp_path / "pic.json", [small, big] if small_first else [big, small], "pic.png"
    )

    mask = _single_mask(rasterise_labelme([json_path], ["background", "cat", "dog"], tmp_path))

    assert int((mask == 2).sum()) == (0 if small_first else 4 * 5)


def test_labelme_missing_images_and_unknown_labels_are_problems(tmp_path):
    # Catches a crash on a JSON whose image was not copied along, a wrong imagePath that could
    # be resolved by the JSON's own name, and labels silently dropped.
    _image(tmp_path / "moved.jpg", width=12, height=8)
    moved = _labelme(
        tmp_path / "moved.json",
        [
            _shape("cat", [[0, 0], [3, 3]], "rectangle"),
            _shape("bird", [[0, 0], [1, 1]], "rectangle"),
        ],
        "C:\\old\\place\\moved.jpg",
        imageHeight=None,
        imageWidth=None,
    )
    gone = _labelme(tmp_path / "gone.json", [_shape("cat", [[0, 0], [3, 3]], "rectangle")], "x.jpg")

    result = rasterise_labelme([gone, moved], ["background", "cat"], tmp_path / "cache")

    assert [image.name for image, _ in result.pairs] == ["moved.jpg"]
    assert _mask(result.pairs[0][1]).shape == (8, 12)  # size from the image's header
    assert len(result.problems) == 2
    assert str(gone) in result.problems[0] and "missing" in result.problems[0]
    assert str(moved) in result.problems[1] and "'bird'" in result.problems[1]


def test_labelme_files_skips_other_json(tmp_path):
    # Catches COCO files, class tables or broken JSON taken for LabelMe annotations.
    _labelme(tmp_path / "b.json", [], "b.png")
    _labelme(tmp_path / "a.json", [], "a.png")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"]}))
    (tmp_path / "broken.json").write_text("{")
    assert [path.name for path in labelme_files(tmp_path)] == ["a.json", "b.json"]


# -- the module itself ------------------------------------------------------------------------
def test_import_does_not_load_torch():
    # Catches the layout detector paying torch's start-up cost just to find annotations.
    code = "import sys, segcli.data.annotations; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
