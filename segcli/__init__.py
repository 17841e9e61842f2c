"""segcli: semantic segmentation for PyTorch behind one command, `seg`.

The Python API is the command's own inference path, kept loaded between calls:

    from segcli import Segmenter
    segmenter = Segmenter.load("runs/unet-resnet18/best.safetensors")  # or an .onnx file
    mask = segmenter.predict("photo.jpg")  # H x W class indices at the photo's size
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__"]

if TYPE_CHECKING:
    from segcli.infer.segmenter import Segmenter


def __getattr__(name: str) -> Any:
    # Imported on first use: `seg --help` imports this package and must not pay for torch.
    if name == "Segmenter":
        from segcli.infer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'segcli' has no attribute {name!r}")
