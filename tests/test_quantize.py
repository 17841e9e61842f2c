"""seg export --int8: an INT8 ONNX file is written only through the accuracy gate, carries the
gate's figures, and runs through seg predict like any exported model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli import quantize
from segcli.checkpoint import load_model, save_checkpoint
from segcli.data import mock_root
from segcli.errors import UsageError
from segcli.export import export_model
from segcli.infer.evaluate import evaluate_checkpoint
from tests.helpers import write_mock_checkpoint

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Without CBAM: untrained weights leave near-tied logits, and INT8's rounding at CBAM's
    # gates flips 3% of those labels. A trained default model passes the gate (99.96% of
    # labels agree after the README's main job).
    folder = tmp_path_factory.mktemp("int8") / "run"
    return write_mock_checkpoint(folder / "best.safetensors", attention="none")


@pytest.fixture(scope="module")
def int8_export(checkpoint: Path) -> tuple[Path, dict]:
    from tests.conftest import run_seg

    done = run_seg("export", str(checkpoint), "--int8", "--calib-images", "4", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    return Path(report["path"]), report


def test_int8_file_is_quantized_gated_and_records_the_gate(checkpoint, int8_export):
    # Catches a "quantized" file that is still fp32 (no int8 weights, no QDQ nodes), a gate
    # whose mIoU figures are not what seg eval measures on the same split, and figures
    # missing from the file's metadata.
    path, report = int8_export
    assert path == checkpoint.with_name("best.int8.onnx") and path.is_file()
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every conv of the ResNet-18 UNet, per channel
    assert report["bytes"] < 0.3 * report["fp32_bytes"]
    gate = report["gate"]
    assert gate["passed"] and gate["agreement"] >= 0.99 and gate["images"] == 8
    assert gate["miou_fp32"] - gate["miou_int8"] <= 0.005
    assert gate["calibration_images"] == 4 and gate["calibration_source"] == "training split"
    assert quantize.read_gate(path) == gate
    # amp off: the gate scores fp32, while `--amp auto` is bf16 on hosts with native bf16.
    fp32 = evaluate_checkpoint(checkpoint, data=str(mock_root()), batch_size=8, amp="off")
    int8 = evaluate_checkpoint(path, data=str(mock_root()), batch_size=8)
    assert gate["miou_fp32"] == pytest.approx(fp32["miou"], abs=1e-12)
    assert gate["miou_int8"] == pytest.approx(int8["miou"], abs=1e-12)


def test_predict_runs_the_int8_file_like_the_checkpoint(checkpoint, int8_export, tmp_path, seg):
    # Catches an INT8 file seg predict cannot open (metadata lost in quantization) or reads
    # with another preprocessing: its masks must agree with the checkpoint's.
    path, _ = int8_export
    image = next((mock_root() / "val" / "images").iterdir())
    for name, model in (("fp32", checkpoint), ("int8", path)):
        done = seg("predict", str(model), str(image), "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
    masks = [
        np.asarray(Image.open(tmp_path / name / f"{image.stem}.png")) for name in ("fp32", "int8")
    ]
    assert masks[0].shape == masks[1].shape
    assert (masks[0] == masks[1]).mean() >= 0.99


def test_a_model_that_fails_the_gate_exits_1_and_writes_nothing(
    checkpoint, tmp_path, monkeypatch, seg
):
    # Catches a gate that passes whatever the quantizer produced: here the "quantized" file is
    # another model altogether, so its labels disagree with the checkpoint's.
    def another_model(fp32, out, inputs, scratch, input_name):
        other, info = load_model(write_mock_checkpoint(tmp_path / "other.safetensors", seed=3))
        export_model(other, info, Path(out), fmt="onnx", dynamic=True, check=False)

    monkeypatch.setattr(quantize, "quantize_onnx", another_model)
    out = tmp_path / "out" / "model.int8.onnx"
    done = seg("export", str(checkpoint), "--int8", "--calib-images", "2", "--out", str(out))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "fails the accuracy gate" in last and "agree on" in last and "mIoU" in last
    assert "no file written" in last
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_bad_int8_input_is_one_line_and_exit_2(checkpoint, tmp_path, seg):
    # Catches a calibration folder without images, or flags --int8 cannot honour, being
    # ignored or ending in a traceback, and files written on the way.
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    cases = [
        (["--int8", "--calib", str(empty)], "--calib"),
        (["--int8", "--calib", str(tmp_path / "missing")], "not a folder"),
        (["--int8", "--format", "torchscript"], "--int8 writes ONNX"),
        (["--int8", "--static"], "drop --static"),
        (["--int8", "--size", "32"], "drop --size"),
        (["--calib", str(empty)], "add --int8"),
        (["--int8", "--data", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for flags, fragment in cases:
        done = seg("export", str(checkpoint), *flags, "--out", str(tmp_path / "x.onnx"))
        assert done.returncode == 2, (flags, done.stderr)
        message = done.stderr.strip()
        assert "\n" not in message and fragment in message, (flags, message)
        assert not (tmp_path / "x.onnx").exists()


def test_the_default_data_is_the_one_the_checkpoint_was_trained_on(checkpoint, tmp_path):
    # Catches the gate silently scoring on the bundled mock data when the checkpoint names
    # another dataset, and an unhelpful error when that dataset is gone.
    model, info = load_model(checkpoint)
    moved = tmp_path / "moved.safetensors"
    save_checkpoint(
        moved, model, dataclasses.replace(info, config={"data": str(tmp_path / "gone")})
    )
    with pytest.raises(UsageError, match=r"gone, which is not here; pass `data`"):
        quantize.export_int8(moved, tmp_path / "m.onnx")
    assert quantize.training_data(info, None) == mock_root()
    assert quantize.training_data(info, tmp_path) == tmp_path


def test_calibration_images_are_spread_over_the_folder(tmp_path):
    # Catches calibrating on the first N files only (one scene of a sorted folder) and
    # non-image files picked up.
    for index in range(10):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{index:02d}.png")
    (tmp_path / "readme.md").write_text("x")
    files, source = quantize.calibration_files(tmp_path, [], 3)
    assert [f.name for f in files] == ["00.png", "03.png", "06.png"] and source == str(tmp_path)
    files, _ = quantize.calibration_files(tmp_path, [], 50)
    assert len(files) == 10
    train = [Path(f"t{i}.png") for i in range(4)]
    assert quantize.calibration_files(None, train, 2) == ([train[0], train[2]], "training split")
    with pytest.raises(UsageError, match="at least 1 image"):
        quantize.calibration_files(None, train, 0)
