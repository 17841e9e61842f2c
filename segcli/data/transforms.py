"""Joint image/mask transforms (torchvision.transforms.v2 with tv_tensors), sizes and
normalisation.

Geometric transforms see the image and the `tv_tensors.Mask` together, so both get the same
crop, flip and rotation; v2 resizes and rotates masks with nearest neighbour and the fill
dictionaries below pad masks with the ignore index. Photometric transforms touch images only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from segcli.data.classes import IGNORE_INDEX
from segcli.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixels that geometric transforms bring in from outside the image: black image, ignored mask.
_FILL: dict[type, int] = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def parse_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """`"256"` -> (256, 256); `"256x320"` -> (256, 320) as H x W. Raises UsageError otherwise."""
    if isinstance(text, int):
        text = str(text)
    elif not isinstance(text, str):
        text = "x".join(str(v) for v in text)
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if match is None:
        raise UsageError(f"`size` '{text}': write N or HxW, e.g. 256 or 256x320")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    if not (8 <= height <= 16384 and 8 <= width <= 16384):
        raise UsageError(f"`size` '{text}': each side must be between 8 and 16384 pixels")
    return height, width


def default_normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB (what pretrained encoders expect); their channel average for
    gray; ImageNet plus an alpha channel of mostly 1s for RGBA; mid-range for anything else."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    if in_channels == 4:
        return (*IMAGENET_MEAN, 0.5), (*IMAGENET_STD, 0.5)
    return (0.5,) * in_channels, (0.25,) * in_channels


@dataclass
class AugmentConfig:
    """Training augmentation; each part can be switched off on its own.

    zoom: random scale jitter: the image is resized to the training size times a factor drawn
    from this range, keeping its aspect, then cropped (or padded with ignored pixels) back to
    the training size, the usual recipe of segmentation codebases (None: off);
    scale: instead of zoom, the area range of a random resized crop (aspect jittered 3/4-4/3);
    hflip / vflip: random flips; rotate: maximum rotation in degrees (0: off);
    color_jitter: brightness/contrast/saturation strength (0: off; hue gets a quarter of it).

    The defaults (zoom 0.75-1.25 and horizontal flips only) learnt faster than the random
    resized crop with rotation and colour jitter that segcli used before (see the README's
    accuracy section)."""

    scale: tuple[float, float] | None = None
    hflip: bool = True
    vflip: bool = False
    rotate: float = 0.0
    color_jitter: float = 0.0
    zoom: tuple[float, float] | None = (0.75, 1.25)

    def __post_init__(self) -> None:
        if self.scale is not None:  # the random resized crop replaces the zoom
            self.zoom = None
        if self.zoom is not None:
            low, high = self.zoom
            if not 0.0 < low <= high <= 4.0:
                raise UsageError(
                    f"`zoom` {low},{high}: give LOW,HIGH with 0 < LOW <= HIGH <= 4, e.g. 0.75,1.25"
                )
            self.zoom = (float(low), float(high))
        if self.scale is not None:
            low, high = self.scale
            if not 0.0 < low <= high <= 1.0:
                raise UsageError(
                    f"`scale_min` {low}: the crop area range must lie in (0, 1], e.g. 0.5"
                )
            self.scale = (float(low), float(high))
        if not 0.0 <= self.rotate <= 180.0:
            raise UsageError(f"`rotate` {self.rotate}: give degrees between 0 and 180")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise UsageError(f"`color_jitter` {self.color_jitter}: give a strength in [0, 1]")

    @classmethod
    def from_flags(
        cls,
        augment: bool = True,
        scale_min: float | None = None,
        hflip: bool = True,
        vflip: bool = False,
        rotate: float = 0.0,
        color_jitter: float = 0.0,
        zoom: str | tuple[float, float] | None = (0.75, 1.25),
    ) -> AugmentConfig | None:
        """Build from CLI flags; `augment=False` (or every part off) gives None. A
        `scale_min` below 1 selects the random resized crop instead of `zoom`."""
        if not augment:
            return None
        scale = None if scale_min is None or scale_min >= 1.0 else (scale_min, 1.0)
        jitter = None if scale is not None else parse_zoom(zoom)
        config = cls(scale, hflip, vflip, rotate, color_jitter, jitter)
        return None if config.is_identity() else config

    def is_identity(self) -> bool:
        return (
            (self.zoom is None or self.zoom == (1.0, 1.0))
            and self.scale is None
            and not self.hflip
            and not self.vflip
            and self.rotate == 0
            and self.color_jitter == 0
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale"] = list(self.scale) if self.scale is not None else None
        data["zoom"] = list(self.zoom) if self.zoom is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        scale, zoom = data.get("scale"), data.get("zoom")
        return cls(
            scale=tuple(scale) if scale is not None else None,  # type: ignore[arg-type]
            hflip=bool(data.get("hflip", True)),
            vflip=bool(data.get("vflip", False)),
            rotate=float(data.get("rotate", 0.0)),
            color_jitter=float(data.get("color_jitter", 0.0)),
            zoom=tuple(zoom) if zoom is not None else None,  # type: ignore[arg-type]
        )


def parse_zoom(zoom: str | Sequence[float] | None) -> tuple[float, float] | None:
    """`"0.75,1.25"` -> (0.75, 1.25); one number F means (F, F); None stays None."""
    if zoom is None or not isinstance(zoom, str):
        return None if zoom is None else (float(zoom[0]), float(zoom[-1]))
    try:
        values = [float(part) for part in zoom.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UsageError(f"`zoom` {zoom}: give LOW,HIGH, e.g. 0.75,1.25 (1,1 turns it off)")
    return values[0], values[-1]


class _ColorJitter(v2.ColorJitter):
    """ColorJitter that also accepts RGBA images: the colour channels are jittered, alpha kept."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image) and inpt.shape[-3] == 4:
            rgb = super().transform(inpt[..., :3, :, :], params)
            return tv_tensors.wrap(torch.cat([rgb, inpt[..., 3:, :, :]], dim=-3), like=inpt)
        return super().transform(inpt, params)


class Rescale(v2.Transform):
    """Resize by a factor drawn uniformly from [low, high] per call (antialiased bilinear for
    images, nearest for masks): of the input's own size, or of `size` when given (one resize
    where "to the training size, then jittered" would take two). low == high is a fixed
    factor, and 1 without `size` leaves the input as is."""

    def __init__(
        self, low: float, high: float | None = None, size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.low, self.high = low, low if high is None else high
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"factor": factor}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        factor = params["factor"]
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        if factor == 1.0 and self.size is None:
            return inpt
        base = self.size if self.size is not None else inpt.shape[-2:]
        size = [max(1, round(side * factor)) for side in base]
        return v2.functional.resize(inpt, size, antialias=True)


def build_transforms(
    size: tuple[int, int] | None,
    augment: AugmentConfig | None,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float | None = None,
) -> v2.Compose:
    """The joint pipeline: (resize with zoom jitter and a crop | random resized crop | resize),
    flips, rotation, colour jitter, then float conversion and normalisation. `augment=None`
    (evaluation) only resizes. `size=None` keeps each image's own size.

    `scale` selects native-resolution patches (the `patches` policy): the image is resized by
    `scale` (times the augmentation's zoom, when it has one) instead of to `size`; with a `size`
    (training) a random `size` crop of it is taken, padded with the ignore index where the
    image is smaller; without one (evaluation) the whole rescaled image stays, for sliding
    windows."""
    steps: list[v2.Transform] = []
    zoom = augment.zoom if augment is not None else None
    if scale is not None:
        low, high = zoom or (1.0, 1.0)
        steps.append(Rescale(scale * low, scale * high))
        if size is not None:
            steps.append(v2.RandomCrop(size, pad_if_needed=True, fill=_FILL))
    elif augment is not None and augment.scale is not None and size is not None:
        steps.append(v2.RandomResizedCrop(size, scale=augment.scale, antialias=True))
    elif zoom is not None and size is not None:
        steps.append(Rescale(*zoom, size=size))
        steps.append(v2.RandomCrop(size, pad_if_needed=True, fill=_FILL))
    elif size is not None:
        steps.append(v2.Resize(size, antialias=True))
    if augment is not None:
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.vflip:
            steps.append(v2.RandomVerticalFlip())
        if augment.rotate > 0:
            steps.append(v2.RandomRotation(augment.rotate, fill=_FILL))
        if augment.color_jitter > 0:
            strength = augment.color_jitter
            steps.append(_ColorJitter(strength, strength, strength, hue=strength / 4))
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)
