"""An ONNX file from `seg export` standing in for a checkpoint: onnxruntime runs the graph, and
the file's `segcli` metadata (CheckpointInfo JSON) says how to feed it and name its classes.

The export contract: input `images` (N x C x H x W float32, dynamic N, H, W), output `logits`,
and `metadata_props["segcli"] = CheckpointInfo.to_json()`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segcli.checkpoint import METADATA_KEY, CheckpointInfo, info_from_metadata
from segcli.errors import UsageError, first_line

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class OnnxSegModel:
    """Callable like the eager model: a torch batch in, torch logits out on the batch's device.
    onnxruntime computes in float32 on its own threads, so callers run it without autocast."""

    def __init__(self, session: object) -> None:
        self.session = session

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(images.device)


def _providers(device: torch.device, available: list[str]) -> list[str]:
    """CUDA first when the user asked for a CUDA device and this onnxruntime build has it."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[OnnxSegModel, CheckpointInfo]:
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
            f"{names_in} -> {names_out}; export it with `seg export`"
        )
    metadata = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in metadata:
        raise UsageError(f"{path}: ONNX file without segcli metadata; export it with `seg export`")
    return OnnxSegModel(session), info_from_metadata(path, metadata[METADATA_KEY])
