"""Ensembles of checkpoints in `seg predict` and `seg eval`: the mean of the members' logits
through the one Segmenter path, run folders of folds, and members that cannot be averaged."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcli.checkpoint import (
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from segcli.data import read_image
from segcli.errors import UsageError
from segcli.infer.ensemble import Ensemble, expand_models, split_models
from segcli.infer.segmenter import Segmenter
from tests.helpers import write_mock_checkpoint

# --amp off: the CLI's `auto` may pick bf16 on this CPU, and the references are fp32.
RUN = ["--device", "cpu", "--amp", "off", "--workers", "0"]


def variant(source: Path, path: Path, **changes: object) -> Path:
    """`source`'s weights under changed metadata, as another training setup would write."""
    model, info = load_model(source)
    save_checkpoint(path, model, dataclasses.replace(info, **changes))
    return path


def link(source: Path, target: Path) -> Path:
    # Checkpoints are tens of MB; a hard link reads the same.
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)
    return target


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("members")
    return write_mock_checkpoint(folder / "a.safetensors", 0), write_mock_checkpoint(
        folder / "b.safetensors", 1
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "img.png"
    rng = np.random.default_rng(0)
    # Odd size: the logits are resized back to it, as predict writes them.
    Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)).save(path)
    return path


def restored_logits(segmenter: Segmenter, image: Path) -> torch.Tensor:
    (logits,) = segmenter._restored_logits([image])
    return logits


# --- the mean of the members -----------------------------------------------------------------


def test_ensemble_logits_are_the_mean_of_the_members(
    members: tuple[Path, Path], image: Path
) -> None:
    # Catches summing instead of averaging, running one member only, or precision and memory
    # layout applied to the first member only.
    a, b = members
    options = {"device": "cpu", "amp": "off", "tta": True}
    ensemble = Segmenter.load([a, b], **options)
    alone = [Segmenter.load(path, **options) for path in (a, b)]
    assert isinstance(ensemble.model, Ensemble) and len(ensemble.model.members) == 2
    assert ensemble.checkpoints == [a, b] and alone[0].checkpoints == [a]
    assert not isinstance(alone[0].model, Ensemble)  # one checkpoint: the model itself
    assert ensemble.info.class_names == alone[0].info.class_names
    for member in ensemble.model.members:
        weight = next(p for p in member.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last)

    batch = ensemble.preprocess(read_image(image))[None]
    with torch.inference_mode():
        logits = ensemble.logits(batch)
        each = [one.logits(batch) for one in alone]
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # members really differ
    assert torch.allclose(logits, (each[0] + each[1]) / 2, atol=1e-5)

    # Through the rest of the path: restored to the image's size, softmax last.
    expected = torch.softmax(
        (restored_logits(alone[0], image) + restored_logits(alone[1], image)) / 2, dim=0
    )
    assert torch.allclose(torch.from_numpy(ensemble.probabilities(image)), expected, atol=1e-5)


def test_predict_with_two_checkpoints_writes_the_averaged_prediction(
    seg, members: tuple[Path, Path], image: Path, tmp_path: Path
) -> None:
    # Catches the CLI taking the second checkpoint for an input image, or averaging
    # probabilities instead of logits.
    a, b = members
    out = tmp_path / "p"
    result = seg("predict", str(a), str(b), str(image), "--out", str(out), "--format", "prob", *RUN)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out / 'img.npy'}\n"
    said = [line for line in result.stderr.splitlines() if "ensemble" in line]
    assert said == [f"seg: ensemble of 2 checkpoints: {a}, {b}"]

    alone = [Segmenter.load(path, device="cpu", amp="off") for path in (a, b)]
    mean = (restored_logits(alone[0], image) + restored_logits(alone[1], image)) / 2
    probabilities = np.load(out / "img.npy")
    assert probabilities.shape == (3, 37, 51)
    np.testing.assert_allclose(probabilities, torch.softmax(mean, 0).numpy(), atol=2e-3)

    index = seg("predict", str(a), str(b), str(image), "--out", str(tmp_path / "i"), *RUN)
    assert index.returncode == 0, index.stderr
    mask = np.asarray(Image.open(tmp_path / "i" / "img.png"))
    assert np.array_equal(mask, mean.argmax(0).numpy())


# --- model arguments -------------------------------------------------------------------------


def test_fold_folders_expand_in_fold_order(tmp_path: Path) -> None:
    # Catches sorting fold names as text (fold_10 before fold_2) and taking a folds run's
    # files in directory order.
    run = tmp_path / "run"
    for fold in (10, 2, 0, 1):
        (run / f"fold_{fold}").mkdir(parents=True)
        (run / f"fold_{fold}" / "best.safetensors").touch()
    (run / "fold_notes").mkdir()
    single = tmp_path / "single"
    single.mkdir()
    (single / "best.safetensors").touch()
    expanded = expand_models([run, single, tmp_path / "x.safetensors"])
    assert expanded == [
        *(run / f"fold_{fold}" / "best.safetensors" for fold in (0, 1, 2, 10)),
        single / "best.safetensors",
        tmp_path / "x.safetensors",
    ]


def test_models_and_inputs_are_split_where_the_models_end(tmp_path: Path) -> None:
    # Catches an image folder or `-` taken for a model, and a second checkpoint taken for an
    # image (the single-checkpoint call must stay as it was).
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_0" / "best.safetensors").touch()
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "x.png").touch()
    assert split_models(["a.safetensors", str(images)]) == (["a.safetensors"], [str(images)])
    assert split_models(["a.safetensors", "-"]) == (["a.safetensors"], ["-"])
    assert split_models(["a.safetensors", "b.onnx", str(run), "x.png", "c.safetensors"]) == (
        ["a.safetensors", "b.onnx", str(run)],
        ["x.png", "c.safetensors"],
    )
    with pytest.raises(
        UsageError, match=r"no inputs after the models a\.safetensors b\.safetensors"
    ):
        split_models(["a.safetensors", "b.safetensors"])


def test_eval_of_a_folds_folder_reports_every_fold(
    seg, members: tuple[Path, Path], tmp_path: Path
) -> None:
    # Catches a folds folder read as one checkpoint (or as its first fold) and the JSON not
    # saying which checkpoints were scored.
    a, b = members
    run = tmp_path / "run"
    folds = [
        link(a, run / "fold_0" / "best.safetensors"),
        link(b, run / "fold_1" / "best.safetensors"),
    ]
    result = seg("eval", str(run), "--json", *RUN)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoints"] == [str(path) for path in folds]
    assert report["checkpoint"] == str(run) and report["epoch"] is None
    assert result.stderr.count("ensemble of 2 checkpoints") == 1

    single = json.loads(seg("eval", str(a), "--json", *RUN).stdout)
    assert single["checkpoints"] == [str(a)] and single["epoch"] == 0
    assert single["confusion_matrix"] != report["confusion_matrix"]


# --- refusals --------------------------------------------------------------------------------


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg: error: "), result.stderr
    return lines[0]


def test_members_that_disagree_are_refused_naming_both(
    seg, members: tuple[Path, Path], image: Path, tmp_path: Path
) -> None:
    # Catches averaging logits of models that see images differently or name classes
    # differently: the masks would be silently wrong.
    a, _ = members
    _, info = read_checkpoint(a)
    spec = {**info.spec.to_dict(), "size": [96, 96]}
    bigger = variant(a, tmp_path / "bigger.safetensors", input_size=(96, 96), inference=spec)
    line = one_line_error(
        seg("predict", str(a), str(bigger), str(image), "--out", str(tmp_path / "o"), *RUN)
    )
    assert f"{a} and {bigger} differ in input size (64x64 vs 96x96)" in line

    renamed = {**info.classes, "names": ["background", "disc", "box"]}
    other = variant(a, tmp_path / "other.safetensors", classes=renamed)
    line = one_line_error(seg("eval", str(a), str(other), *RUN))
    assert f"{a} and {other} differ in classes" in line
    assert "background, circle, rectangle vs background, disc, box" in line

    line = one_line_error(seg("eval", str(a), str(tmp_path / "m.onnx"), *RUN))
    assert "m.onnx" in line and "ONNX" in line


def test_a_fold_without_best_checkpoint_is_named(
    seg, members: tuple[Path, Path], image: Path, tmp_path: Path
) -> None:
    # Catches silently ensembling fewer folds than the run has.
    run = tmp_path / "run"
    link(members[0], run / "fold_0" / "best.safetensors")
    (run / "fold_1").mkdir()
    for command in (
        ["eval", str(run)],
        ["predict", str(run), str(image), "--out", str(tmp_path / "o")],
    ):
        line = one_line_error(seg(*command, *RUN))
        assert f"{run / 'fold_1'}: no best.safetensors" in line
