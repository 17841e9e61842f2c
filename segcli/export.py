"""Export a checkpoint's model to ONNX, TorchScript or a torch.export ExportedProgram, and check
the exported file against PyTorch on random input.

Export runs on CPU, in eval mode, in fp32. The file is written to a temporary name, checked,
and only then renamed into place, so a model that exports wrongly never leaves a file behind.

ONNX contract (relied on by `segcli.infer.onnx_model`): one input `images` (N x C x H x W
float32, already normalised), one output `logits` (N x classes x H x W); with dynamic shapes
N, H and W are free. `metadata_props["segcli"]` holds `CheckpointInfo.to_json()`; the other
metadata keys are conveniences for tools that do not parse it."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcli.checkpoint import METADATA_KEY, CheckpointInfo
from segcli.errors import RuntimeFailure, UsageError, choose
from segcli.files import atomic_write

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
DEFAULT_OPSET = 17
# fp32 export and runtime reorder sums differently; 1e-3 on logits is far above that noise and
# far below any real divergence (a wrong op typically differs by O(1)).
TOLERANCE = 1e-3
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


@dataclass
class ExportResult:
    path: Path
    format: str
    dynamic: bool
    size: tuple[int, int]
    export_seconds: float
    bytes: int
    max_abs_diff: float | None  # None when the check was skipped
    label_agreement: float | None  # on the decoded check image; None when skipped
    checked_shapes: list[tuple[int, ...]]

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "format": self.format,
            "dynamic": self.dynamic,
            "size": list(self.size),
            "export_seconds": round(self.export_seconds, 3),
            "bytes": self.bytes,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": TOLERANCE,
            "label_agreement": self.label_agreement,
            "checked_shapes": [list(s) for s in self.checked_shapes],
        }


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def default_output(checkpoint: Path, fmt: str) -> Path:
    """`model.safetensors` -> `model.onnx` (or `.torchscript.pt`, `.pt2`) beside it."""
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def _example(in_channels: int, size: tuple[int, int], dynamic: bool) -> torch.Tensor:
    # Batch 2 when dynamic: torch.export specialises a dimension traced at size 1 to a constant.
    return torch.randn(2 if dynamic else 1, in_channels, *size)


def _divisor(model: nn.Module) -> int:
    return int(getattr(model, "size_divisor", 1))


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _check_shapes(
    in_channels: int, size: tuple[int, int], dynamic: bool, step: int
) -> list[tuple[int, ...]]:
    """The export shape, plus, for a dynamic model, another batch and an off-stride size
    (rounded up to `step`, which is 1 except for exported programs), so the check proves the
    shapes really are free."""
    height, width = size
    shapes = [(1, in_channels, height, width)]
    if dynamic:
        other = (_round_up(height * 3 // 4 + 1, step), _round_up(width * 5 // 4 + 3, step))
        shapes.append((2, in_channels, *other))
    return shapes


def _pool_matrix(length: torch.Tensor | int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """bins x length averaging weights of adaptive average pooling along one axis: bin i
    covers [floor(i*L/b), ceil((i+1)*L/b)), exactly as torch's adaptive_avg_pool2d."""
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class MatmulAdaptiveAvgPool2d(nn.Module):
    """adaptive_avg_pool2d as two matrix products. The TorchScript ONNX exporter only handles
    bins that divide a statically known input size; this form exports with free H and W (the
    check compares it with the original module)."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.bins = (output_size, output_size) if isinstance(output_size, int) else output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _pool_matrix(x.shape[-2], self.bins[0], x)
        cols = _pool_matrix(x.shape[-1], self.bins[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _scatter_unpool2d(
    input: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    output_size: object = None,
) -> torch.Tensor:
    """2x2 max-unpooling as a scatter into a 2H x 2W plane (the indices are flat positions in
    that plane). torch's max_unpool2d cannot be traced with traced sizes (it checks them with
    Python bools); segcli models unpool 2x2 only, on sizes padded to a multiple of 2."""
    n, c, h, w = input.shape
    plane = input.new_zeros(n, c, h * w * 4)
    return plane.scatter(2, indices.flatten(2), input.flatten(2)).view(n, c, h * 2, w * 2)


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """A copy of `model` with the two ops tracing cannot export swapped for equivalent forms:
    adaptive average pooling to more than one bin, and 2x2 max-unpooling (patched in
    torch.nn.functional for the duration, as models call it functionally)."""
    # deepcopy of torchvision's fx feature extractors comes back in training mode: restore it.
    model = copy.deepcopy(model).train(model.training)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                setattr(parent, name, MatmulAdaptiveAvgPool2d(child.output_size))
    original = F.max_unpool2d
    F.max_unpool2d = _scatter_unpool2d
    try:
        yield model
    finally:
        F.max_unpool2d = original


def write_onnx(
    model: nn.Module,
    info: CheckpointInfo,
    example: torch.Tensor,
    path: str,
    *,
    dynamic: bool,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export to ONNX at `path` and add the checkpoint's metadata."""
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript-based exporter: the dynamo one needs onnxscript, an extra dependency, and
    # the TorchScript one exports every segcli architecture (README table).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None,
            do_constant_folding=True,
        )
    proto = onnx.load(path)
    metadata = {
        METADATA_KEY: info.to_json(),
        "classes": json.dumps(info.class_names),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "input_size": json.dumps(list(info.input_size)),
        "arch": str(info.model["arch"]),
        "backbone": str(info.model["backbone"]),
        "dynamic": json.dumps(dynamic),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "segcli"
    onnx.save(proto, path)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic in padding
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, path)


def _export_program(model: nn.Module, example: torch.Tensor, path: str, *, dynamic: bool) -> None:
    shapes = None
    if dynamic:
        divisor = _divisor(model)
        if divisor == 1:
            # Unpadded models (dilated ResNets) have no padding arithmetic to guard on: torch.export
            # infers each dimension's range itself (e.g. at least 9 pixels for DeepLabv3).
            auto = torch.export.Dim.AUTO
            shapes = ({0: auto, 2: auto, 3: auto},)
        else:
            # H and W in steps of the padding divisor: with other remainders torch.export guards
            # on the padding arithmetic and rejects them at run time. From two steps, because a
            # deepest feature map of size 1 is specialised to a constant.
            height = torch.export.Dim("height_blocks", min=2) * divisor
            width = torch.export.Dim("width_blocks", min=2) * divisor
            shapes = ({0: torch.export.Dim("batch", min=1), 2: height, 3: width},)
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    torch.export.save(program, path)


def load_exported(path: str, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file as a model callable on CPU tensors, the way the Segmenter runs it."""
    if fmt == "onnx":
        import onnxruntime

        from segcli.infer.onnx_model import onnxruntime_model

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return onnxruntime_model(session)
    if fmt == "torchscript":
        return torch.jit.load(path)
    return torch.export.load(path).module()


def _failure(fmt: str, what: str, error: Exception) -> RuntimeFailure:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return RuntimeFailure(
        f"exported {fmt} model fails on {what}: {type(error).__name__}: {first[:200]}"
    )


def check_image(in_channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 image as a decoder returns it, at a size training never saw (1.5x the model size,
    odd sides): smooth shapes plus noise, so the labels have borders to disagree on."""
    from segcli.data import image_from_array

    height, width = size[0] * 3 // 2 + 7, size[1] * 3 // 2 + 5
    generator = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    shapes = (np.sin(yy / 9.0) + np.cos(xx / 13.0) + 2) * 60
    pixels = shapes[..., None] + generator.integers(0, 16, (height, width, 3))
    array = np.clip(pixels, 0, 255).astype(np.uint8)
    return image_from_array(array[..., 0] if in_channels == 1 else array)


@dataclass
class CheckResult:
    max_abs_diff: float  # logits, over random inputs and the decoded image
    label_agreement: float  # share of the decoded image's pixels with the same label


def check_export(
    model: nn.Module,
    info: CheckpointInfo,
    path: str,
    fmt: str,
    shapes: list[tuple[int, ...]],
    size: tuple[int, int],
    image: torch.Tensor | None = None,
    seed: int = 0,
) -> CheckResult:
    """The exported file against PyTorch: logits on random inputs of `shapes`, then a decoded
        image through the one inference path (`Segmenter`: preprocessing, run, logits restored to
        the image's size, labels) with the live model and with the file. `image`: a decoded image
    (`data.read_image`); default `check_image`."""
    from segcli.device import Precision
    from segcli.infer.segmenter import Segmenter

    exported = load_exported(path, fmt)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        images = torch.randn(*shape, generator=generator)
        expected = model(images)
        try:
            actual = exported(images)
        except Exception as error:
            raise _failure(fmt, f"input {list(shape)}", error) from None
        if actual.shape != expected.shape:
            raise RuntimeFailure(
                f"exported {fmt} model gives shape {list(actual.shape)} for input "
                f"{list(shape)}, PyTorch {list(expected.shape)}"
            )
        worst = max(worst, float((actual - expected).abs().max()))
    run = {
        "device": torch.device("cpu"),
        "precision": Precision(None, channels_last=False),
        "size": size,
    }
    live, from_file = (Segmenter(net, info, **run) for net in (model, exported))
    if image is None:
        image = check_image(int(info.model["in_channels"]), size)
    batch = live.preprocess(image)[None]
    original = tuple(image.shape[-2:])
    try:
        logits = [s.restore(s.logits(batch), original) for s in (live, from_file)]
    except Exception as error:
        raise _failure(fmt, f"a decoded {original[0]}x{original[1]} image", error) from None
    worst = max(worst, float((logits[0] - logits[1]).abs().max()))
    labels = [s.labels(one) for s, one in zip((live, from_file), logits, strict=True)]
    agreement = float((labels[0] == labels[1]).float().mean())
    return CheckResult(worst, agreement)


def export_model(
    model: nn.Module,
    info: CheckpointInfo,
    out: Path,
    *,
    fmt: str,
    size: tuple[int, int] | None = None,
    dynamic: bool | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool | None = None,
    check_with: Path | None = None,
) -> ExportResult:
    """Export `model` (moved to CPU, eval, fp32) to `out`. `dynamic=None` means dynamic N, H, W
    except for TorchScript, whose tracer bakes the padding arithmetic in as constants.
    `check=None` checks whenever the runtime is there (onnxruntime for ONNX; always for the
    torch formats); `check_with` is an image file for the decoded-image part of the check
    (default: `check_image`)."""
    choose("`format`", fmt, FORMATS)
    if dynamic is None:
        dynamic = fmt != "torchscript"
    if dynamic and fmt == "torchscript":
        raise UsageError(
            "`format` torchscript is traced at one input shape (`static`); for free batch, "
            "height and width use `format` onnx or exported-program"
        )
    if fmt == "onnx" and not onnx_available():
        raise UsageError("`format` onnx needs the onnx package: pip install 'segcli[onnx]'")
    if check is None:
        check = fmt != "onnx" or onnxruntime_available()
    if check and fmt == "onnx" and not onnxruntime_available():
        raise UsageError(
            "`check` on ONNX needs onnxruntime: pip install 'segcli[onnx]', or pass `no_check`"
        )
    if not 7 <= opset <= 20:
        raise UsageError(f"`opset` must be between 7 and 20 for this exporter, not {opset}")
    size = tuple(size or info.input_size)  # type: ignore[assignment]
    model = model.cpu().float().eval()
    in_channels = int(info.model["in_channels"])
    example = _example(in_channels, size, dynamic)
    divisor = _divisor(model)
    off_step = size[0] % divisor or size[1] % divisor or min(size) < 2 * divisor
    if fmt == "exported-program" and dynamic and divisor > 1 and off_step:
        raise UsageError(
            f"`size` {size[0]}x{size[1]}: a dynamic exported program of this model takes "
            f"sizes in steps of {divisor} from {2 * divisor}; pass such a `size` or `static`"
        )
    step = divisor if fmt == "exported-program" else 1
    if check_with is not None and not check:
        raise UsageError("`check_image` is used by the check; drop `no_check`")
    image = None
    if check_with is not None:
        from segcli.data import read_image

        image = read_image(check_with)
    shapes = _check_shapes(in_channels, size, dynamic, step)
    outcome: dict[str, float | None] = {"max_abs_diff": None, "label_agreement": None}

    def write(temporary: str) -> None:
        started = time.perf_counter()
        try:
            if fmt == "onnx":
                with traceable(model) as friendly:
                    write_onnx(friendly, info, example, temporary, dynamic=dynamic, opset=opset)
            elif fmt == "torchscript":
                with traceable(model) as friendly:
                    _export_torchscript(friendly, example, temporary)
            else:
                _export_program(model, example, temporary, dynamic=dynamic)
        except Exception as error:
            text = str(error).strip()
            first = text.splitlines()[0][:200] if text else ""
            raise RuntimeFailure(
                f"{info.model['arch']}/{info.model['backbone']} does not export to {fmt}: "
                f"{type(error).__name__}: {first}"
            ) from None
        outcome["export_seconds"] = time.perf_counter() - started
        if check:
            checked = check_export(model, info, temporary, fmt, shapes, size, image)
            difference = checked.max_abs_diff
            outcome["max_abs_diff"] = difference
            outcome["label_agreement"] = checked.label_agreement
            if not difference < TOLERANCE:
                raise RuntimeFailure(
                    f"{fmt} export differs from PyTorch by {difference:.3g} (max abs, must be "
                    f"below {TOLERANCE:g}); no file written"
                )

    with torch.no_grad():
        atomic_write(out, write)
    return ExportResult(
        path=out,
        format=fmt,
        dynamic=dynamic,
        size=size,
        export_seconds=float(outcome["export_seconds"] or 0.0),
        bytes=out.stat().st_size,
        max_abs_diff=outcome["max_abs_diff"],
        label_agreement=outcome["label_agreement"],
        checked_shapes=shapes if check else [],
    )
