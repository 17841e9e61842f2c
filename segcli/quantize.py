"""INT8 ONNX models behind an accuracy gate.

`export_int8` exports a checkpoint to ONNX (checked like any `seg export`), quantizes it with
ONNX Runtime's static quantization (QDQ: int8 weights per output channel, uint8 activations
whose ranges are calibrated on real images; the first and last convolutions stay float), then
scores the fp32 model and the INT8 file on a labelled split through the one inference path.
The file is written only when the INT8 labels agree with fp32 on at least 99% of the pixels
and its mIoU is at most 0.5 points lower; the figures go into the file's metadata (key
`segcli_int8`) next to the checkpoint's own (`segcli`), so `seg predict` runs it like any
exported model.

Weights use 7 bits of the int8 range (`reduce_range`): x86 CPUs without VNNI multiply uint8 by
int8 with 16-bit saturating adds, and a full-range file quantized on one CPU could lose accuracy
on another that the gate never saw."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcli.checkpoint import CheckpointInfo, load_model
from segcli.errors import RuntimeFailure, UsageError, first_line
from segcli.files import atomic_write

MIN_AGREEMENT = 0.99
MAX_MIOU_DROP = 0.005  # half a point of mIoU
GATE_KEY = "segcli_int8"
DEFAULT_CALIBRATION_IMAGES = 32


@dataclass
class GateResult:
    """fp32 against INT8 on one labelled split, through the same preprocessing and labels."""

    data: str
    split: str
    images: int
    agreement: float  # share of scored pixels with the same label
    miou_fp32: float
    miou_int8: float
    calibration_images: int
    calibration_source: str

    @property
    def miou_drop(self) -> float:
        return self.miou_fp32 - self.miou_int8

    @property
    def passed(self) -> bool:
        # A NaN mIoU (no labelled pixel) cannot show that INT8 keeps the accuracy.
        return self.agreement >= MIN_AGREEMENT and self.miou_drop <= MAX_MIOU_DROP

    def describe(self) -> str:
        return (
            f"labels agree on {100 * self.agreement:.2f}% of pixels (needs >= "
            f"{100 * MIN_AGREEMENT:g}%), mIoU {self.miou_fp32:.4f} fp32 -> {self.miou_int8:.4f} "
            f"INT8 ({-100 * self.miou_drop:+.2f} points, allowed -{100 * MAX_MIOU_DROP:g}) on "
            f"{self.images} {self.split} images"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "miou_drop": self.miou_drop,
            "min_agreement": MIN_AGREEMENT,
            "max_miou_drop": MAX_MIOU_DROP,
            "passed": self.passed,
        }


@dataclass
class Int8Result:
    path: Path
    bytes: int
    fp32_bytes: int
    seconds: float
    gate: GateResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "onnx",
            "precision": "int8",
            "bytes": self.bytes,
            "fp32_bytes": self.fp32_bytes,
            "seconds": round(self.seconds, 3),
            "gate": self.gate.to_dict(),
        }


class GateFailure(RuntimeFailure):
    """The INT8 model is not accurate enough: exit 1, no file."""

    def __init__(self, gate: GateResult) -> None:
        super().__init__(f"INT8 model fails the accuracy gate: {gate.describe()}; no file written")
        self.gate = gate


def default_int8_output(checkpoint: Path) -> Path:
    """`best.safetensors` -> `best.int8.onnx` beside it."""
    return checkpoint.with_name(checkpoint.stem + ".int8.onnx")


def require_quantization() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"`int8` needs {' and '.join(missing)}: pip install 'segcli[onnx]'")


def training_data(info: CheckpointInfo, data: str | Path | None) -> Path:
    """The dataset the gate and the default calibration read: `data`, else the one the
    checkpoint was trained on (the bundled mock set when it names none)."""
    from segcli.data import mock_root

    if data is not None:
        return Path(data).expanduser()
    trained_on = info.config.get("data")
    if trained_on is None:
        return mock_root()
    root = Path(str(trained_on)).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"the checkpoint was trained on {root}, which is not here; pass `data` with a "
            "labelled copy of that dataset"
        )
    return root


def calibration_files(
    calib: Path | None, train_images: Sequence[Path], count: int
) -> tuple[list[Path], str]:
    """Up to `count` images spread evenly over `calib` (a folder, searched recursively) or over
    the training images, and a description of where they came from."""
    from segcli.data.io import is_image_file

    if count < 1:
        raise UsageError(f"`calib_images` {count}: calibrate on at least 1 image, e.g. 32")
    if calib is not None:
        if not calib.is_dir():
            raise UsageError(f"`calib` {calib}: not a folder; pass a folder of images")
        candidates = sorted(p for p in calib.rglob("*") if p.is_file() and is_image_file(p))
        if not candidates:
            raise UsageError(
                f"`calib` {calib}: no images (.png, .jpg, .tif, ...) in it; pass a folder of "
                "images like the ones the model will see"
            )
        source = str(calib)
    else:
        candidates = list(train_images)
        if not candidates:
            raise UsageError("the dataset has no training images to calibrate on; pass `calib`")
        source = "training split"
    step = len(candidates) / min(count, len(candidates))
    picked = [candidates[int(i * step)] for i in range(min(count, len(candidates)))]
    return picked, source


def _calibration_inputs(segmenter: Any, files: Sequence[Path]) -> Iterator[np.ndarray]:
    from segcli.data import read_image

    for path in files:
        image = segmenter.preprocess(read_image(path), path)
        yield np.ascontiguousarray(image[None].numpy(), dtype=np.float32)


def quantize_onnx(
    fp32: Path, out: Path, inputs: Iterator[np.ndarray], scratch: Path, input_name: str
) -> None:
    """Static QDQ quantization of `fp32` into `out`, activation ranges from `inputs`; `out`
    keeps `fp32`'s metadata (the checkpoint's info), which the quantizer drops."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            array = next(inputs, None)
            return None if array is None else {input_name: array}

    import onnx

    prepared = scratch / "prepared.onnx"
    # Folds BatchNorm into convolutions and infers shapes, so each conv is quantized once.
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    convolutions = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # The stem sees raw pixels and the head writes the logits the argmax reads: in float
        # they cost little time and keep labels closer to fp32 (stanford_background UNet-R18,
        # agreement 99.08% -> 99.47%).
        nodes_to_exclude=[convolutions[0], convolutions[-1]] if len(convolutions) > 2 else [],
    )
    _copy_metadata(fp32, out)


def score_against(
    reference: Any, candidate: Any, loader: Any, scored_classes: int, ignore_index: int
) -> tuple[float, float, float]:
    """(label agreement over scored pixels, reference mIoU, candidate mIoU) on `loader`."""
    from segcli.device import inference_mode
    from segcli.infer.evaluate import scored_pairs
    from segcli.metrics import ConfusionMatrix

    matrices = [ConfusionMatrix(scored_classes, ignore_index) for _ in range(2)]
    same = total = 0
    with inference_mode(reference.model):
        for images, masks in loader:
            labels = []
            for segmenter, matrix in zip((reference, candidate), matrices, strict=True):
                pairs = scored_pairs(segmenter, images, masks)
                batch = [(segmenter.labels(score), mask) for score, mask in pairs]
                for predicted, mask in batch:
                    matrix.update(predicted, mask)
                labels.append(batch)
            for (first, mask), (second, _) in zip(*labels, strict=True):
                scored = mask != ignore_index
                same += int(((first == second) & scored).sum())
                total += int(scored.sum())
    agreement = same / total if total else float("nan")
    reference_miou, candidate_miou = (float(m.compute()["miou"]) for m in matrices)
    return agreement, reference_miou, candidate_miou


def export_int8(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    split: str = "val",
    calib: str | Path | None = None,
    calib_images: int = DEFAULT_CALIBRATION_IMAGES,
    batch_size: int = 8,
    workers: int | None = None,
    opset: int = 17,
    step: Callable[[str], None] | None = None,
) -> Int8Result:
    """Quantize a checkpoint to an INT8 ONNX file and write it only if it passes the gate
    (module docstring); raises GateFailure (exit 1) otherwise. `step(text)` is told what
    starts next, for a CLI to show."""
    from segcli.device import Precision
    from segcli.export import export_model
    from segcli.infer.evaluate import scoring_data
    from segcli.infer.onnx_model import INPUT_NAME, load_onnx
    from segcli.infer.segmenter import Segmenter

    require_quantization()
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    target = Path(out) if out is not None else default_int8_output(checkpoint)
    say = step or (lambda text: None)
    model, info = load_model(checkpoint, "cpu")
    fp32 = Precision(None, channels_last=False)
    cpu = torch.device("cpu")
    reference = Segmenter(model, info, device=cpu, precision=fp32, checkpoints=[checkpoint])
    root = training_data(info, data)
    scoring = scoring_data(
        reference, data=root, split=split, batch_size=batch_size, workers=workers
    )
    # Calibration never sees an image the gate scores: the gate would flatter the ranges.
    scored = set(scoring.images)
    train_images = [
        image for image, _ in scoring.dataset.splits.get("train", []) if image not in scored
    ]
    files, source = calibration_files(
        Path(calib).expanduser() if calib is not None else None, train_images, calib_images
    )
    with tempfile.TemporaryDirectory(prefix="segcli-int8-") as folder:
        scratch = Path(folder)
        say("exporting fp32 ONNX")
        exported = export_model(
            model, info, scratch / "fp32.onnx", fmt="onnx", dynamic=True, opset=opset
        )
        say(f"calibrating on {len(files)} images ({source})")
        quantized = scratch / "int8.onnx"
        try:
            quantize_onnx(
                exported.path,
                quantized,
                _calibration_inputs(reference, files),
                scratch,
                INPUT_NAME,
            )
        except UsageError:  # an unreadable calibration image, named by read_image
            raise
        except Exception as error:  # onnxruntime's quantizer raises untyped errors
            raise RuntimeFailure(
                f"{info.model['arch']}/{info.model['backbone']} does not quantize: "
                f"{type(error).__name__}: {first_line(error)}"
            ) from None
        int8_model, _ = load_onnx(quantized)
        candidate = Segmenter(int8_model, info, device=cpu, precision=fp32)
        say(f"scoring fp32 and INT8 on {len(scoring.images)} {split} images of {root}")
        agreement, miou_fp32, miou_int8 = score_against(
            reference, candidate, scoring.loader, info.scored_classes, info.ignore_index
        )
        gate = GateResult(
            data=str(root),
            split=split,
            images=len(scoring.images),
            agreement=agreement,
            miou_fp32=miou_fp32,
            miou_int8=miou_int8,
            calibration_images=len(files),
            calibration_source=source,
        )
        if not gate.passed:
            raise GateFailure(gate)
        _write_with_gate(quantized, target, gate)
        fp32_bytes = exported.bytes
    return Int8Result(
        target, target.stat().st_size, fp32_bytes, time.perf_counter() - started, gate
    )


def _copy_metadata(source: Path, target: Path) -> None:
    import onnx

    have = {entry.key: entry.value for entry in onnx.load(str(source)).metadata_props}
    proto = onnx.load(str(target))
    present = {entry.key for entry in proto.metadata_props}
    for key, value in have.items():
        if key not in present:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(proto, str(target))


def _write_with_gate(quantized: Path, target: Path, gate: GateResult) -> None:
    import onnx

    proto = onnx.load(str(quantized))
    entry = proto.metadata_props.add()
    entry.key, entry.value = GATE_KEY, json.dumps(gate.to_dict(), allow_nan=False)
    atomic_write(target, lambda temporary: onnx.save(proto, temporary))


def read_gate(path: str | Path) -> dict[str, Any] | None:
    """The gate figures stored in an INT8 file by `export_int8`, or None for an fp32 file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == GATE_KEY:
            return json.loads(entry.value)
    return None
