"""SegNet (Badrinarayanan et al. 2017): a VGG16-BN encoder whose max-pooling indices drive
max-unpooling in a mirrored decoder (29,444,739 parameters at 3 classes, the published count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.models.base import SegmentationModel
from segcli.models.encoders import build_encoder
from segcli.models.registry import register_model

# The decoder mirrors VGG16's conv stages (deepest first); each width list gives the outputs of
# that stage's 3x3 convs after unpooling. The last stage ends in the classifier instead.
DECODER_STAGES = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def conv_bias_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """SegNet's layer: 3x3 conv *with* bias (as in the VGG16-BN it mirrors), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegNet(SegmentationModel):
    def __init__(
        self, in_channels: int, classes: int, pretrained: bool, backbone_weights: str | None
    ) -> None:
        super().__init__(size_divisor=32)
        self.encoder = build_encoder(
            "vgg16_bn", in_channels, pretrained=pretrained, backbone_weights=backbone_weights
        )
        stages = []
        previous = self.encoder.out_channels[-1]
        for widths in DECODER_STAGES:
            layers = []
            for width in widths:
                layers.append(conv_bias_bn_relu(previous, width))
                previous = width
            stages.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages)
        self.classify = nn.Conv2d(previous, classes, 3, padding=1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        # The encoder taps precede each max-pool; pooling them again here yields the indices
        # (the encoder's own pools discard them, and re-pooling is cheap next to the convs).
        taps = self.encoder(x)
        indices = []
        for tap in taps:
            y, where = F.max_pool2d(tap, 2, return_indices=True)
            indices.append(where)
        for stage, tap, where in zip(self.decoder, taps[::-1], indices[::-1], strict=True):
            y = stage(F.max_unpool2d(y, where, 2, output_size=tap.shape[-2:]))
        return self.classify(y)


@register_model(
    "segnet",
    title="SegNet (Badrinarayanan et al. 2017): VGG16-BN encoder, max-unpooling decoder",
    backbones=("vgg16_bn",),
    default_backbone="vgg16_bn",
)
def segnet(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> SegNet:
    """SegNet on VGG16-BN; `pretrained` loads its ImageNet weights into the encoder."""
    return SegNet(in_channels, classes, pretrained, backbone_weights)
