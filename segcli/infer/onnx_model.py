"""An ONNX file from `seg export` standing in for a checkpoint: onnxruntime runs the graph, and
the file's `segcli` metadata (CheckpointInfo JSON) says how to feed it and name its classes.

The export contract: input `images` (N x C x H x W float32, dynamic N, H, W), output `logits`,
and `metadata_props["segcli"] = CheckpointInfo.to_json()`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcli.checkpoint import METADATA_KEY, CheckpointInfo, info_from_metadata
from segcli.errors import RuntimeFailure, UsageError, first_line

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ExportedModel:
    """Callable like the eager model: a torch batch in, float32 torch logits out on the batch's
    device. `run` maps one contiguous float32 NCHW array to the logits array; the runtimes
    compute in float32 on their own threads, so callers run them without autocast."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], runtime: str) -> None:
        self.run, self.runtime = run, runtime

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(np.asarray(self.run(array))).to(images.device)


def onnxruntime_model(session: Any) -> ExportedModel:
    return ExportedModel(
        lambda array: session.run([OUTPUT_NAME], {INPUT_NAME: array})[0], "onnxruntime"
    )


def _providers(device: torch.device, available: list[str]) -> list[str]:
    """CUDA first when the user asked for a CUDA device and this onnxruntime build has it."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[ExportedModel, CheckpointInfo]:
    """Open an exported model, or raise a one-line UsageError saying what is wrong."""
    path = Path(path)
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(
            f"{path}: running ONNX models needs onnxruntime; pip install 'segcli[onnx]'"
        ) from None
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise to users
    try:
        session = onnxruntime.InferenceSession(
            str(path),
            sess_options=options,
            providers=_providers(torch.device(device), onnxruntime.get_available_providers()),
        )
    except Exception as error:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
        raise UsageError(f"{path}: not a loadable ONNX model ({first_line(error)})") from None
    names_in = [node.name for node in session.get_inputs()]
    names_out = [node.name for node in session.get_outputs()]
    if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
        raise UsageError(
            f"{path}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}', found "
            f"{names_in} -> {names_out}; export it with 'seg export'"
        )
    metadata = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in metadata:
        raise UsageError(f"{path}: ONNX file without segcli metadata; export it with 'seg export'")
    return onnxruntime_model(session), info_from_metadata(path, metadata[METADATA_KEY])


def onnx_info(path: Path) -> CheckpointInfo:
    """The CheckpointInfo `seg export` stored in an ONNX file's metadata, read with onnx."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends, untyped
        raise UsageError(f"{path}: not a loadable ONNX model ({first_line(error)})") from None
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if METADATA_KEY not in metadata:
        raise UsageError(f"{path}: ONNX file without segcli metadata; export it with 'seg export'")
    return info_from_metadata(path, metadata[METADATA_KEY])


def load_openvino(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[ExportedModel, CheckpointInfo]:
    """Compile an exported model with OpenVINO for the CPU, in float32: OpenVINO would otherwise
    compute in bf16 on CPUs that have it, and every runtime is to give fp32 results."""
    path = Path(path)
    from segcli.infer.runtimes import require

    require("openvino")
    import openvino

    if torch.device(device).type != "cpu":
        raise UsageError(f"`runtime` openvino runs on the CPU here; drop `device` {device}")
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file")
    info = onnx_info(path)
    core = openvino.Core()
    try:
        compiled = core.compile_model(
            core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
    except Exception as error:  # OpenVINO raises RuntimeError with multi-line reports
        raise RuntimeFailure(f"{path}: OpenVINO cannot compile it ({first_line(error)})") from None
    output = compiled.output(0)
    return ExportedModel(lambda array: compiled(array)[output], "openvino"), info
