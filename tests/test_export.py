"""seg export: each format exports a small model and matches PyTorch; failures are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcli import export as export_engine
from segcli.checkpoint import CheckpointInfo, model_build_config, save_checkpoint
from segcli.errors import RuntimeFailure, UsageError
from segcli.models import MODELS, build_model
from tests.helpers import randomise_attention

SIZE = (64, 64)


def make_checkpoint(path: Path, arch: str = "unet", backbone: str | None = "resnet18") -> Path:
    torch.manual_seed(0)
    model = randomise_attention(build_model(arch, backbone, in_channels=3, classes=3))
    info = CheckpointInfo(
        model=model_build_config(model),
        classes={"names": ["background", "road", "car"]},
        input_size=SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export") / "tiny.safetensors")


def export(checkpoint: Path, out: Path, **options: object) -> export_engine.ExportResult:
    from segcli.checkpoint import load_model

    model, info = load_model(checkpoint)
    return export_engine.export_model(model, info, out, **options)


def test_onnx_contract_metadata_and_check(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    result = export(checkpoint, tmp_path / "m.onnx", fmt="onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    assert len(result.checked_shapes) == 2  # dynamic: a second batch and size were run
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    metadata = {p.key: p.value for p in proto.metadata_props}
    info = CheckpointInfo.from_json(metadata["segcli"])
    assert info.class_names == ["background", "road", "car"]
    assert info.input_size == SIZE and info.mean == (0.485, 0.456, 0.406)
    assert json.loads(metadata["classes"]) == info.class_names
    # The exported file carries the spec predict and eval follow for it.
    assert json.loads(metadata["segcli"])["inference"]["size"] == list(SIZE)
    assert info.spec.activation == "softmax" and info.spec.policy == "resize"


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_export_and_check(checkpoint: Path, tmp_path: Path, fmt: str) -> None:
    result = export(checkpoint, tmp_path / "m", fmt=fmt)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    exported = export_engine.load_exported(str(result.path), fmt)
    assert exported(torch.zeros(1, 3, *SIZE)).shape == (1, 3, *SIZE)


def test_unpadded_model_exports_a_program_free_in_every_size(tmp_path: Path) -> None:
    """Dilated ResNets have no padding divisor: the program takes any batch and size (checked at
    an odd size), not only steps of 32."""
    checkpoint = make_checkpoint(tmp_path / "d.safetensors", "deeplabv3", "resnet18")
    result = export(checkpoint, tmp_path / "d.pt2", fmt="exported-program")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    assert any(shape[2] % 2 and shape[3] % 2 for shape in result.checked_shapes)
    exported = export_engine.load_exported(str(result.path), "exported-program")
    assert exported(torch.zeros(3, 3, 45, 71)).shape == (3, 3, 45, 71)


def test_padded_program_needs_two_steps(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="steps of 32 from 64"):
        export(checkpoint, tmp_path / "p.pt2", fmt="exported-program", size=(32, 32))


def test_static_onnx_has_fixed_shape(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    result = export(checkpoint, tmp_path / "s.onnx", fmt="onnx", dynamic=False, size=(32, 48))
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 48]


def test_failed_check_exits_1_and_writes_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_engine, "TOLERANCE", -1.0)
    out = tmp_path / "bad.pt"
    with pytest.raises(RuntimeFailure, match="differs from PyTorch"):
        export(checkpoint, out, fmt="torchscript", dynamic=False)
    assert list(tmp_path.iterdir()) == []


def test_without_onnxruntime(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_engine, "onnxruntime_available", lambda: False)
    with pytest.raises(UsageError, match="needs onnxruntime"):
        export(checkpoint, tmp_path / "a.onnx", fmt="onnx", check=True)
    result = export(checkpoint, tmp_path / "b.onnx", fmt="onnx", dynamic=False)
    assert result.max_abs_diff is None and result.path.is_file()


def test_traceable_forms_equal_torch_ops() -> None:
    x = torch.randn(2, 4, 13, 22)
    for bins in (2, 3, 6):
        pooled = export_engine.MatmulAdaptiveAvgPool2d(bins)(x)
        torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, bins))
    y, where = F.max_pool2d(torch.randn(2, 4, 12, 22), 2, return_indices=True)
    torch.testing.assert_close(
        export_engine._scatter_unpool2d(y, where, 2), F.max_unpool2d(y, where, 2)
    )


def test_cli_json_and_one_line_errors(checkpoint: Path, tmp_path: Path, seg) -> None:
    out = tmp_path / "cli.onnx"
    done = seg("export", str(checkpoint), "--out", str(out), "--static", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "onnx" and report["max_abs_diff"] < 1e-3 and out.is_file()

    bad = seg("export", str(checkpoint), "--format", "tflite")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "tflite" in bad.stderr

    missing = seg("export", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0

    traced = seg("export", str(checkpoint), "--format", "torchscript", "--dynamic")
    assert traced.returncode == 2 and "--static" in traced.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("fmt", export_engine.FORMATS)
def test_every_architecture_exports(arch: str, fmt: str, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "m.safetensors", arch, None)
    divisor = build_model(arch, None, in_channels=3, classes=3).size_divisor
    size = (max(SIZE[0], 2 * divisor),) * 2  # dynamic programs start at two padding steps
    result = export(checkpoint, tmp_path / "m.out", fmt=fmt, size=size)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3


def test_check_runs_a_decoded_image_through_the_inference_path(
    checkpoint: Path, tmp_path: Path, seg
) -> None:
    """Guards against the check seeing only random tensors: a user's image is decoded, resized
    and normalised as seg predict does, run by both models and compared as logits and labels;
    an unreadable --check-image is a one-line usage error and no file is written."""
    from PIL import Image

    rng = np.random.default_rng(1)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (77, 53, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "m.onnx"
    done = seg("export", str(checkpoint), "--out", str(out), "--check-image", str(photo), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["label_agreement"] >= 0.9999 and report["max_abs_diff"] < 1e-3

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    refused = seg(
        "export", str(checkpoint), "--out", str(tmp_path / "n.onnx"), "--check-image", str(broken)
    )
    assert refused.returncode == 2 and "broken.png" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    assert not (tmp_path / "n.onnx").exists()


def test_check_fails_when_the_file_disagrees_on_the_decoded_image(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that matches PyTorch on the random check shapes but not at the decoded image's
    run (here: wrong only on inputs in the normalised range of real pixels) is
    refused: the decoded image is part of the gate, not only a reported figure."""
    real_load = export_engine.load_exported

    def load_drifting(path: str, fmt: str):
        exported = real_load(path, fmt)

        def run(images: torch.Tensor) -> torch.Tensor:
            logits = exported(images)
            # Normalised pixels stay below (1 - 0.406) / 0.225 = 2.64; thousands of randn
            # values always exceed 3 somewhere.
            looks_like_a_photo = float(images.max()) < 3.0
            return logits + 0.5 if looks_like_a_photo else logits

        return run

    monkeypatch.setattr(export_engine, "load_exported", load_drifting)
    out = tmp_path / "drift.pt"
    with pytest.raises(RuntimeFailure, match="differs from PyTorch"):
        export(checkpoint, out, fmt="torchscript", dynamic=False)
    assert not out.exists()
