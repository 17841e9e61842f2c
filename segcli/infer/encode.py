"""Masks as files: a prediction's logits encoded as `seg predict` writes them (PNG of class
indices, colour palette PNG, overlay on the image, or float16 `.npy` probabilities), with the
pixel count of each class. `seg predict` and `seg serve` share it, so their bytes are equal."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from segcli.checkpoint import CheckpointInfo
from segcli.errors import UsageError
from segcli.infer.inference import labels_from_logits, probabilities_from_logits

FORMATS = ("index", "color", "overlay", "prob")
# Overlay: how much of the class colour shows over the image.
OVERLAY_ALPHA = 0.5
# zlib level 1: label maps are long runs of equal bytes, so the file is barely bigger than at
# the default level 6, and encoding a large map is several times faster.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class OutputSpec:
    """How to turn scores into an output file."""

    format: str
    threshold: float
    class_names: list[str]
    palette: torch.Tensor  # K x 3 uint8
    # Added to class indices in index PNGs: 1 for reduce-zero-label data, whose masks hold
    # class k as raw k+1, so predictions read like the dataset's own masks.
    index_offset: int = 0

    @classmethod
    def from_info(cls, info: CheckpointInfo, format: str, threshold: float) -> OutputSpec:
        from segcli.data.classes import ClassMapping, default_palette

        count = info.scored_classes
        if count > 256 and format in ("index", "color", "overlay"):
            raise UsageError(f"`format` {format} holds at most 256 classes; this model has {count}")
        names = info.class_names[:count]
        names += [str(index) for index in range(len(names), count)]
        mapping = ClassMapping.from_dict(info.classes)
        colors = mapping.palette[:count]
        colors += default_palette(count)[len(colors) :]
        offset = int(mapping.reduce_zero_label)
        if format == "index" and count + offset > 256:
            raise UsageError("`format` index holds at most 255 classes after reduce-zero-label")
        return cls(format, threshold, names, torch.tensor(colors, dtype=torch.uint8), offset)

    def render(
        self, logits: torch.Tensor, original: torch.Tensor | None
    ) -> tuple[bytes, list[int]]:
        """The file's bytes and the pixel count of each class for K x H x W logits at the
        original size."""
        labels = labels_from_logits(logits[None], self.threshold)[0].to(torch.uint8).cpu()
        # numpy counts uint8 directly; torch.bincount wants int64 and is ~10x slower here.
        counts = np.bincount(labels.numpy().ravel(), minlength=len(self.class_names)).tolist()
        if self.format == "prob":
            probabilities = probabilities_from_logits(logits[None])[0]
            buffer = io.BytesIO()
            np.save(buffer, probabilities.to(torch.float16).cpu().numpy())
            return buffer.getvalue(), counts
        if self.format == "overlay":
            assert original is not None  # the dataset keeps originals for overlays
            return png_bytes(blend(original, labels, self.palette).permute(1, 2, 0).numpy()), counts
        if self.format == "color":
            return png_bytes(labels.numpy(), self.palette), counts
        return png_bytes(labels.numpy() + np.uint8(self.index_offset)), counts


def blend(original: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """3 x H x W uint8: the image with each pixel's class colour mixed in. Classes coloured black
    (the background of the default palette) leave the image as it is instead of darkening it."""
    colors = palette[labels.long()].permute(2, 0, 1).float()
    mixed = original.float() * (1 - OVERLAY_ALPHA) + colors * OVERLAY_ALPHA
    painted = (palette.long().sum(dim=1) > 0)[labels.long()]
    return torch.where(painted, mixed.round_(), original.float()).to(torch.uint8)


def png_bytes(array: np.ndarray, palette: torch.Tensor | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        image.putpalette(palette.flatten().tolist())  # makes the L image a palette (P) image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
