"""Dataset layouts read directly (VOC, Cityscapes, ADE20K, flat), ignore values, the automatic
val split and K-fold splits: each on a tiny fixture the test writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.data import check_dataset
from segcli.data.classes import ClassMapping, default_palette
from segcli.data.layouts import CITYSCAPES_CLASSES, VOC_CLASSES
from segcli.data.splits import holdout, kfold, load_split, plan_split, save_split
from segcli.errors import UsageError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _image(path: Path, height: int = 12, width: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8))
    if palette:
        image.putpalette([c for color in default_palette(256) for c in color])
    image.save(path)


def _stripes(*values: int, height: int = 12, width: int = 16) -> np.ndarray:
    """Vertical stripes of the given raw values, left to right."""
    mask = np.zeros((height, width), np.uint8)
    for index, value in enumerate(values):
        mask[:, index * width // len(values) :] = value
    return mask


# --- Pascal VOC ------------------------------------------------------------------------------


def make_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    ids = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, names in ids.items():
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            _image(base / "JPEGImages" / f"{name}.jpg")
            _mask(base / "SegmentationClass" / f"{name}.png", _stripes(0, 15, 255), palette=True)
    (lists / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    return root / "VOCdevkit"


def test_voc_layout_is_read_with_its_classes(tmp_path: Path) -> None:
    # Catches: trainval read as a third split (images counted twice), the VOC names or colours
    # not applied, 255 (the border) scored as a class.
    report = check_dataset(make_voc(tmp_path))
    assert report.info.format == "voc"
    assert report.counts == {"train": 2, "val": 1}
    assert report.mapping.names == list(VOC_CLASSES)
    assert report.mapping.palette[15] == (192, 128, 128)  # person in the VOC colour map
    pixels = report.splits["train"].class_pixels
    assert pixels[0] == pixels[15] > 0 and sum(pixels) == pixels[0] + pixels[15]
    assert report.splits["train"].ignored_pixels == 2 * 12 * 6  # the last 6 columns are 255


def test_voc_list_naming_a_missing_image_is_one_line(tmp_path: Path, seg) -> None:
    # Catches: a traceback or a silently shorter split when a list names a missing file.
    root = make_voc(tmp_path)
    lists = root / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("2007_000003\n2007_000404\n")
    result = seg("check", str(root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "val.txt:2" in lines[0] and "2007_000404" in lines[0]


# --- Cityscapes ------------------------------------------------------------------------------


def make_cityscapes(root: Path) -> Path:
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        # road (7), car (26), unlabeled (0), ground (6): the last two are not training classes.
        labels = _stripes(7, 26, 0, 6)
        _mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels)
    return root


def test_cityscapes_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    # Catches: label ids used as class indices (car would be class 26 of 19), or the ids of no
    # training class refused or trained on instead of ignored.
    report = check_dataset(make_cityscapes(tmp_path))
    assert report.info.format == "cityscapes"
    names = [name for name, _, _ in CITYSCAPES_CLASSES]
    assert report.mapping.names == names
    mask = report.mapping.encode(_stripes(7, 26, 0, 6), "m")
    assert mask[0].tolist() == [0] * 4 + [13] * 4 + [255] * 8
    assert report.splits["val"].ignored_pixels == 12 * 8


def test_cityscapes_image_without_labels_is_named(tmp_path: Path, seg) -> None:
    root = make_cityscapes(tmp_path)
    next((root / "gtFine" / "val").rglob("*_labelIds.png")).unlink()
    result = seg("check", str(root))
    assert result.returncode == 2
    assert "lindau_000000_000019_leftImg8bit.png: no labelIds partner" in result.stderr


# --- ADE20K and --reduce-zero-label ----------------------------------------------------------


def make_ade(root: Path, with_names: bool) -> Path:
    for split, count in (("training", 2), ("validation", 1)):
        for index in range(count):
            _image(root / "images" / split / f"ADE_{split}_{index}.jpg")
            _mask(root / "annotations" / split / f"ADE_{split}_{index}.png", _stripes(0, 1, 3))
    if with_names:
        rows = ["Idx\tRatio\tTrain\tVal\tName"]
        rows += [
            f"{i}\t0.1\t1\t1\t{name}"
            for i, name in enumerate(["wall", "building, edifice", "sky"], 1)
        ]
        (root / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("with_names", [True, False])
def test_ade20k_reduces_the_zero_label(tmp_path: Path, with_names: bool) -> None:
    # Catches: 0 ("other") trained as a class, raw k read as class k instead of k-1, the
    # objectInfo150 names not used.
    report = check_dataset(make_ade(tmp_path, with_names))
    assert report.info.format == "ade20k" and report.counts == {"train": 2, "val": 1}
    mapping = report.mapping
    assert mapping.reduce_zero_label
    expected = ["wall", "building", "sky"] if with_names else ["class_1", "class_2", "class_3"]
    assert mapping.names == expected
    assert mapping.encode(_stripes(0, 1, 3), "m")[0].tolist()[::5] == [255, 0, 2, 2]
    assert ClassMapping.from_dict(json.loads(json.dumps(mapping.to_dict()))) == mapping


def test_predictions_of_a_reduced_dataset_are_written_as_raw_values() -> None:
    # Catches: an ADE-trained model writing class k where the dataset's masks say k+1.
    import torch

    from segcli.infer.encode import OutputSpec

    mapping = ClassMapping("index", ["a", "b"], values=[1, 2], reduce_zero_label=True)
    spec = OutputSpec("index", 0.5, ["a", "b"], torch.zeros(2, 3, dtype=torch.uint8), 1)
    logits = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])  # class 0 left, class 1 right
    data, counts = spec.render(logits, None)
    written = np.asarray(Image.open(io.BytesIO(data)))
    assert written.tolist() == [[1, 2]] and counts == [1, 1]
    assert mapping.encode(written, "m").tolist() == [[0, 1]]


# --- ignore values ---------------------------------------------------------------------------


def make_folders(root: Path, masks: dict[str, list[np.ndarray]]) -> Path:
    for split, arrays in masks.items():
        for index, mask in enumerate(arrays):
            _image(root / split / "images" / f"{index}.png", seed=index)
            _mask(root / split / "masks" / f"{index}.png", mask)
    return root


def test_ignore_values_flag_and_class_table(tmp_path: Path, seg) -> None:
    # Catches: CamVid's void (11) refused as a value of no class, or counted as a 12th class.
    masks = {"train": [_stripes(0, 1, 11)], "val": [_stripes(1, 0, 11)]}
    root = make_folders(tmp_path / "camvid", masks)
    assert check_dataset(root).mapping.num_classes == 12  # without the flag: classes 0..11
    report = check_dataset(root, ignore_values=[11])
    assert report.mapping.num_classes == 2
    assert report.splits["train"].ignored_pixels == 12 * 6
    table = root / "classes.json"
    table.write_text(
        json.dumps({"classes": ["sky", "road", {"name": "void", "value": 11, "ignore": True}]})
    )
    from_table = check_dataset(root)
    assert from_table.mapping.names == ["sky", "road"]
    assert from_table.splits["val"].ignored_pixels == 12 * 6
    result = seg("check", str(root), "--ignore-values", "x1")
    assert result.returncode == 2 and "--ignore-values x1" in result.stderr


def test_ignore_value_that_is_a_class_is_refused(tmp_path: Path) -> None:
    root = make_folders(tmp_path / "d", {"train": [_stripes(0, 1)], "val": [_stripes(0, 1)]})
    (root / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(UsageError, match="value 1 is both class 'b' and ignored"):
        check_dataset(root, ignore_values=[1])


# --- automatic val split and folds -----------------------------------------------------------


def _pairs(count: int) -> list[tuple[Path, Path]]:
    return [(Path(f"img/{i:03d}.png"), Path(f"mask/{i:03d}.png")) for i in range(count)]


def test_holdout_is_deterministic_disjoint_and_sized() -> None:
    # Catches: a split that changes between runs (resume would validate on training images),
    # overlapping parts, or a fraction rounded to an empty val set.
    pairs = _pairs(23)
    train, val = holdout(pairs, 0.2, seed=3)
    assert len(val) == 5 and len(train) == 18
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(pairs)
    assert holdout(pairs, 0.2, seed=3) == (train, val)
    assert holdout(pairs, 0.2, seed=4)[1] != val
    assert len(holdout(_pairs(2), 0.01, seed=0)[1]) == 1
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(UsageError, match="`val_fraction`"):
            holdout(pairs, bad, seed=0)
    with pytest.raises(UsageError, match="at least 2"):
        holdout(_pairs(1), 0.2, seed=0)


def test_kfold_partitions_the_pooled_data() -> None:
    # Catches: folds that overlap or miss images (every image must validate exactly once),
    # unbalanced folds, out-of-range --fold accepted.
    pairs = _pairs(11)
    vals = [kfold(pairs, 3, fold, seed=0)[1] for fold in range(3)]
    assert sorted(len(v) for v in vals) == [3, 4, 4]
    assert sorted(p for v in vals for p in v) == sorted(pairs)
    for fold in range(3):
        train, val = kfold(pairs, 3, fold, seed=0)
        assert set(train).isdisjoint(val) and len(train) + len(val) == 11
    with pytest.raises(UsageError, match="`fold` 3"):
        kfold(pairs, 3, 3, seed=0)
    with pytest.raises(UsageError, match="`folds` 12"):
        kfold(pairs, 12, 0, seed=0)


def test_split_file_round_trip_and_missing_file(tmp_path: Path) -> None:
    # Catches: a resumed run re-drawing its split, or silently training on a changed dataset.
    root = make_folders(tmp_path / "d", {"train": [_stripes(0, 1)] * 6})
    info = check_dataset(root, required_splits=("train",)).info
    plan = plan_split(info, val_fraction=0.34, seed=1)
    assert plan.kind == "holdout" and len(plan.val) == 2
    save_split(plan, root, tmp_path / "split.json")
    again = load_split(tmp_path / "split.json", root)
    assert (again.train, again.val) == (plan.train, plan.val)
    plan.val[0][0].unlink()
    with pytest.raises(UsageError, match="no longer exists"):
        load_split(tmp_path / "split.json", root)


def test_flat_folder_trains_with_a_held_out_val_split(tmp_path: Path, seg) -> None:
    # Catches: a dataset without val/ refused, the split not written or not reused on resume.
    masks = [
        _stripes(0, 1),
        _stripes(1, 0),
        _stripes(0, 1, 0),
        _stripes(1, 1, 0),
        _stripes(0, 0, 1),
    ]
    root = tmp_path / "flat"
    for index, mask in enumerate(masks):
        _image(root / "images" / f"{index}.png", seed=index)
        _mask(root / "masks" / f"{index}.png", mask)
    run = tmp_path / "run"
    common = ["--size", "16", "--batch-size", "2", "--workers", "0", "--previews", "0"]
    result = seg(
        "train",
        "unet",
        "--backbone",
        "none",
        "--data",
        str(root),
        "--epochs",
        "1",
        "--val-fraction",
        "0.4",
        "--out",
        str(run),
        *common,
    )
    assert result.returncode == 0, result.stderr
    assert "no val split: holding out 0.4 of train (2 images" in result.stderr
    split = json.loads((run / "split.json").read_text())
    assert split["kind"] == "holdout" and len(split["val"]) == 2 and len(split["train"]) == 3
    before = (run / "split.json").read_text()
    resumed = seg("train", "--resume", str(run / "last.safetensors"), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "split.json").read_text() == before
    scored = seg("eval", str(run / "best.safetensors"), "--data", str(root), "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["images"] == 2  # the held-out images, not all five


def test_bad_split_flags_exit_2(tmp_path: Path, seg) -> None:
    for flags, expected in (
        (["--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["--folds", "3", "--fold", "3"], "--fold 3"),
        (["--fold", "1"], "--fold 1 needs --folds"),
        (["--folds", "40", "--fold", "0"], "--folds 40"),
        (["--format", "pascal"], "--format"),
    ):
        result = seg("train", "unet", "--backbone", "none", "--epochs", "1", *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not (SHARED / "voc_labelme_tiny").is_dir(), reason="needs ../shared/data")
def test_shared_voc_labelme_sample_reads_as_palette_classes() -> None:
    report = check_dataset(SHARED / "voc_labelme_tiny")
    assert report.mapping.kind == "palette" and report.mapping.num_classes == 21
    assert report.counts == {"train": 2, "val": 1}


# --- COCO and LabelMe through the layout detector --------------------------------------------


def make_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    for split, count in (("train", 2), ("val", 1)):
        images, annotations = [], []
        for index in range(count):
            _image(root / split / f"{split}{index}.png", seed=index)
            images.append(
                {"id": index, "file_name": f"{split}{index}.png", "height": 12, "width": 16}
            )
            # cat: columns 0..7 (boundary included) of every row.
            box = [0, 0, 7, 0, 7, 11, 0, 11]
            annotations.append(
                {
                    "id": index,
                    "image_id": index,
                    "category_id": 3,
                    "segmentation": [box],
                    "area": 96,
                }
            )
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_coco_layout_rasterises_into_the_given_cache(tmp_path: Path) -> None:
    # Catches: category ids used as classes, the category order not by id, rasterised masks
    # written into the dataset instead of the cache, COCO not detected.
    root = make_coco(tmp_path / "coco")
    report = check_dataset(root, cache=tmp_path / "cache")
    assert report.info.format == "coco" and report.counts == {"train": 2, "val": 1}
    assert report.mapping.names == ["background", "cat", "dog"]
    assert report.splits["val"].class_pixels == [12 * 8, 12 * 8, 0]
    masks = [mask for pairs in report.info.splits.values() for _, mask in pairs]
    assert all((tmp_path / "cache") in mask.parents for mask in masks)
    assert not list(root.rglob("*.json.png"))


def test_coco_annotation_of_unknown_image_is_reported(tmp_path: Path, seg) -> None:
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"].append(
        {"id": 9, "image_id": 42, "category_id": 3, "segmentation": [[0, 0, 1, 1, 0, 1]]}
    )
    path.write_text(json.dumps(data))
    result = seg("check", str(root))
    assert result.returncode == 2 and "instances_val.json" in result.stderr
    assert "42" in result.stderr and "Traceback" not in result.stderr


def make_labelme(root: Path) -> Path:
    for split, count in (("train", 2), ("val", 1)):
        for index in range(count):
            name = f"{split}{index}"
            _image(root / split / f"{name}.png", seed=index)
            shapes = [
                {"label": "road", "points": [[0, 0], [15, 11]], "shape_type": "rectangle"},
                {"label": "car", "points": [[8, 0], [15, 0], [15, 11], [8, 11]]},
            ]
            doc = {
                "shapes": shapes,
                "imagePath": f"{name}.png",
                "imageHeight": 12,
                "imageWidth": 16,
            }
            (root / split / f"{name}.json").write_text(json.dumps(doc))
    return root


def test_labelme_layout_paints_later_shapes_on_top(tmp_path: Path) -> None:
    # Catches: file order ignored (the car hidden under the road), labels not collected into
    # sorted classes after background.
    report = check_dataset(make_labelme(tmp_path / "lm"), cache=tmp_path / "cache")
    assert report.info.format == "labelme" and report.counts == {"train": 2, "val": 1}
    assert report.mapping.names == ["background", "car", "road"]
    assert report.splits["val"].class_pixels == [0, 12 * 8, 12 * 8]


# --- K-fold training and fold ensembles end to end -------------------------------------------


def test_folds_train_every_fold_and_ensemble_in_predict(tmp_path: Path, seg) -> None:
    # Catches: folds written over each other, no mean +- std, fold splits that overlap, and a
    # folds folder predict cannot use.
    run = tmp_path / "cv"
    result = seg(
        "train",
        "unet",
        "--backbone",
        "none",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--previews",
        "0",
        "--out",
        str(run),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    scores = [fold["val"]["miou"] for fold in summary["folds"]]
    assert len(scores) == 2 and summary["miou_mean"] == pytest.approx(sum(scores) / 2)
    assert summary["miou_std"] == pytest.approx(abs(scores[0] - scores[1]) / 2)
    splits = [json.loads((run / f"fold_{i}" / "split.json").read_text()) for i in range(2)]
    vals = [{image for image, _ in split["val"]} for split in splits]
    assert vals[0].isdisjoint(vals[1]) and len(vals[0]) + len(vals[1]) == 32
    assert {image for image, _ in splits[0]["train"]} == vals[1]
    image = next(
        (Path(__file__).resolve().parents[1] / "data" / "mock" / "val" / "images").iterdir()
    )
    predicted = seg("predict", str(run), str(image), "--out", str(tmp_path / "masks"))
    assert predicted.returncode == 0, predicted.stderr
    assert "ensemble of 2 checkpoints" in predicted.stderr
    assert (tmp_path / "masks" / f"{image.stem}.png").is_file()
