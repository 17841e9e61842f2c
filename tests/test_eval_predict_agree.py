"""`seg eval --full-res` scores exactly the masks `seg predict` writes.

The bug this guards against: eval resized the normalised float image without antialiasing while
predict resized the decoded image with it, so the same checkpoint scored differently from its
own written masks (foreground IoU 0.8205 from eval, 0.8199 from the PNGs on a dermoscopy set).
The test scores predict's PNGs with its own numpy confusion matrix and asks for eval's matrix,
entry for entry, on images 3x the model size in gray, 16-bit, RGBA and RGB.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcli.checkpoint import CheckpointInfo, model_build_config, save_checkpoint
from segcli.data import check_dataset
from segcli.models import build_model

MODEL_SIZE = (64, 64)


def write_dataset(root: Path, binary: bool) -> None:
    """train (2 images) and val (4 images of 90-110 px, one per pixel format) with masks."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            height, width = 96 + 5 * index, 110 - 4 * index
            yy, xx = np.mgrid[:height, :width]
            labels = ((yy // 24 + xx // 30) % 3).astype(np.uint8)
            rgb = (rng.random((height, width, 3)) * 80 + labels[..., None] * 60).astype(np.uint8)
            kind = ("L", "I;16", "RGBA", "RGB")[index % 4] if split == "val" else "RGB"
            if kind == "L":
                image = Image.fromarray(rgb[..., 0])
            elif kind == "I;16":
                image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
            elif kind == "RGBA":
                alpha = np.full((height, width, 1), 255, np.uint8)
                image = Image.fromarray(np.concatenate([rgb, alpha], axis=2))
            else:
                image = Image.fromarray(rgb)
            image.save(root / split / "images" / f"{split}_{index}.png")
            mask = (labels > 0).astype(np.uint8) * 255 if binary else labels
            Image.fromarray(mask).save(root / split / "masks" / f"{split}_{index}.png")


def write_checkpoint(data: Path, path: Path, patches: bool = False) -> CheckpointInfo:
    """An untrained model with everything a trained checkpoint carries: both paths must agree
    on any weights, and random ones leave no ties in the logits. `patches`: as if trained
    with --crop 32 --scale 0.5 (windows of 32 over each image halved)."""
    mapping = check_dataset(data).mapping
    classes = 1 if mapping.kind == "binary" else mapping.num_classes
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", 3, classes).eval()
    info = CheckpointInfo(
        model=model_build_config(model),
        classes=mapping.to_dict(),
        input_size=MODEL_SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        ignore_index=mapping.ignore_index,
    )
    if patches:
        spec = dataclasses.replace(info.spec, policy="patches", size=(32, 32), scale=0.5)
        info = dataclasses.replace(info, inference=spec.to_dict())
    save_checkpoint(path, model, info)
    return info


def score_pngs(data: Path, written: Path, classes: int) -> np.ndarray:
    """The confusion matrix (rows: truth) of predict's index PNGs against the val masks."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for mask_path in sorted((data / "val" / "masks").iterdir()):
        truth = np.asarray(Image.open(mask_path)).astype(np.int64)
        if classes == 2:
            truth = (truth == 255).astype(np.int64)
        predicted = np.asarray(Image.open(written / mask_path.name)).astype(np.int64)
        assert predicted.shape == truth.shape  # written at the image's own size
        np.add.at(matrix, (truth.ravel(), predicted.ravel()), 1)
    return matrix


RUNS = [
    (False, [], False),
    (True, [], False),
    (False, ["--tta"], False),
    (True, ["--tta"], False),
    # 64-pixel model, 32-pixel windows: 3 x 3 Gaussian-weighted windows per image.
    (False, ["--tile", "32"], False),
    (True, ["--tile", "32", "--tta"], False),
    (True, ["--threshold", "0.55"], False),
    # A patch model: no flag, windows of its 32-pixel patches over each image halved.
    (False, [], True),
]


@pytest.mark.parametrize(
    ("binary", "flags", "patches"),
    RUNS,
    ids=[
        f"{'binary' if b else 'multiclass'}{''.join(f)}{'-patches' if p else ''}"
        for b, f, p in RUNS
    ],
)
def test_eval_full_res_scores_exactly_what_predict_writes(seg, tmp_path, binary, flags, patches):
    data = tmp_path / "data"
    write_dataset(data, binary)
    checkpoint = tmp_path / "model.safetensors"
    info = write_checkpoint(data, checkpoint, patches)
    common = ["--batch-size", "3", "--workers", "0", "--device", "cpu", "--amp", "off", *flags]
    out = tmp_path / "masks"
    predicted = seg(
        "predict", str(checkpoint), str(data / "val" / "images"), "--out", str(out), *common
    )
    assert predicted.returncode == 0, predicted.stderr
    evaluated = seg("eval", str(checkpoint), "--data", str(data), "--full-res", "--json", *common)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    expected = score_pngs(data, out, info.scored_classes)
    assert np.array_equal(np.asarray(report["confusion_matrix"]), expected)
    # Every class is predicted somewhere, so the comparison is not between two empty maps.
    assert (expected.sum(axis=0) > 0).sum() >= 2


def test_a_threshold_changes_the_binary_masks(seg, tmp_path):
    """Guards against --threshold being accepted but ignored by eval."""
    data = tmp_path / "data"
    write_dataset(data, binary=True)
    checkpoint = tmp_path / "model.safetensors"
    write_checkpoint(data, checkpoint)
    common = ["--data", str(data), "--full-res", "--json", "--workers", "0", "--amp", "off"]
    low = json.loads(seg("eval", str(checkpoint), *common, "--threshold", "0.05").stdout)
    high = json.loads(seg("eval", str(checkpoint), *common, "--threshold", "0.95").stdout)
    predicted_foreground = [np.asarray(r["confusion_matrix"])[:, 1].sum() for r in (low, high)]
    assert predicted_foreground[0] > predicted_foreground[1]
    assert low["threshold"] == 0.05


def test_onnx_file_scores_like_its_checkpoint(seg, tmp_path):
    """`seg eval model.onnx` goes through the same spec: mIoU within 1e-4 of the checkpoint,
    logits within 1e-3 and labels agreeing on at least 99.99% of pixels."""
    pytest.importorskip("onnxruntime")
    from segcli.infer.segmenter import Segmenter

    data = tmp_path / "data"
    write_dataset(data, binary=False)
    checkpoint = tmp_path / "model.safetensors"
    write_checkpoint(data, checkpoint)
    exported = seg("export", str(checkpoint), "--out", str(tmp_path / "model.onnx"))
    assert exported.returncode == 0, exported.stderr
    common = ["--data", str(data), "--full-res", "--json", "--workers", "0", "--amp", "off"]
    scores = [
        json.loads(seg("eval", str(path), *common).stdout)
        for path in (checkpoint, tmp_path / "model.onnx")
    ]
    assert abs(scores[0]["miou"] - scores[1]["miou"]) < 1e-4
    torch_run = Segmenter.load(checkpoint, device="cpu", amp="off")
    onnx_run = Segmenter.load(tmp_path / "model.onnx", device="cpu")
    for image in sorted((data / "val" / "images").iterdir()):
        from segcli.data import read_image

        batch = torch_run.preprocess(read_image(image))[None]
        with torch.inference_mode():
            expected, actual = torch_run.logits(batch), onnx_run.logits(batch)
        assert torch.allclose(expected, actual, atol=1e-3)
        agree = (torch_run.predict(image) == onnx_run.predict(image)).mean()
        assert agree >= 0.9999
