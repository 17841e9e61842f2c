"""What DeepLab, PSPNet and FCN-ResNet share: a dilated ResNet that keeps layer3 and layer4 at
1/output_stride, a head on layer4, an optional FCN auxiliary head on layer3, and bilinear
upsampling of the logits to the input size, laid out as torchvision's segmentation models are so
their state dicts map onto ours by renaming prefixes."""

from __future__ import annotations

import torch
from torch import nn

from segcli.errors import UsageError
from segcli.models.base import ModelOutput, SegmentationModel
from segcli.models.blocks import resize_to
from segcli.models.encoders import build_encoder


def check_stride(flag: str, stride: int, valid: tuple[int, ...]) -> int:
    """Return `stride` if it is one of `valid`, else raise a UsageError naming `flag`."""
    if stride not in valid:
        choices = ", ".join(str(v) for v in valid)
        raise UsageError(f"{flag} must be one of {choices}, not {stride}")
    return stride


class FCNHead(nn.Sequential):
    """torchvision's FCNHead: 3x3 conv to in/4 channels, BN, ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, classes: int) -> None:
        inner = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inner, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inner, classes, 1),
        )


class DilatedResNetModel(SegmentationModel):
    """Subclasses build their head in `build_head` (a `self.head` on layer4, or modules used by
    a `decode` override), called once the encoder exists.

    No padding (size_divisor 1): torchvision's models run on the raw size, and padding would change
    what the global poolings of ASPP and PPM see."""

    aux_weight = 0.5  # torchvision's reference training recipe

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        classes: int,
        output_stride: int,
        aux: bool,
        pretrained: bool,
        backbone_weights: str | None,
    ) -> None:
        super().__init__(size_divisor=1)
        self.encoder = build_encoder(
            backbone,
            in_channels,
            output_stride=output_stride,
            pretrained=pretrained,
            backbone_weights=backbone_weights,
        )
        self.aux_head = FCNHead(self.encoder.out_channels[3], classes) if aux else None
        self.build_head(classes, output_stride)

    def build_head(self, classes: int, output_stride: int) -> None:
        raise NotImplementedError

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features[-1])

    def forward_padded(self, x: torch.Tensor) -> ModelOutput:
        size = x.shape[-2:]
        features = self.encoder(x)
        out = resize_to(self.decode(features), size)
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": [resize_to(self.aux_head(features[3]), size)]}
        return out
