"""DeepLabv3 (Chen et al. 2017) and DeepLabv3+ (Chen et al. 2018) on dilated ResNets.

The ASPP and the v3 head mirror torchvision's module layout (`ASPP.convs`, `ASPP.project`, the
head Sequential) so that torchvision's deeplabv3_resnet50/101 weights load by renaming
`backbone.` -> `encoder.body.`, `classifier.` -> `head.`, `aux_classifier.` -> `aux_head.`."""

from __future__ import annotations

import torch
from torch import nn

from segcli.models.blocks import conv_bn_relu, resize_to
from segcli.models.dilated import DilatedResNetModel, check_stride
from segcli.models.encoders import RESNETS
from segcli.models.registry import register_model

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48


class ASPPPooling(nn.Sequential):
    """The image-level branch: global average, 1x1 conv, BN, ReLU, broadcast back. Its
    BatchNorm sees one value per image, so training needs batches of 2 or more."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(super().forward(x), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image
    pooling, concatenated and projected to 256 channels."""

    def __init__(self, in_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(in_channels, ASPP_CHANNELS, 1)]
        branches += [conv_bn_relu(in_channels, ASPP_CHANNELS, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(in_channels, ASPP_CHANNELS))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * ASPP_CHANNELS, ASPP_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3(DilatedResNetModel):
    min_train_batch = 2  # ASPPPooling

    def build_head(self, classes: int, output_stride: int) -> None:
        # Flat Sequential (not conv_bn_relu) to keep torchvision's DeepLabHead key names.
        self.head = nn.Sequential(
            ASPP(self.encoder.out_channels[-1], ASPP_RATES[output_stride]),
            nn.Conv2d(ASPP_CHANNELS, ASPP_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Conv2d(ASPP_CHANNELS, classes, 1),
        )


class DeepLabV3Plus(DilatedResNetModel):
    """ASPP at 1/output_stride, upsampled to layer1 (1/4) and fused with its 48-channel
    projection by two 3x3 256-channel convs."""

    min_train_batch = 2  # ASPPPooling

    def build_head(self, classes: int, output_stride: int) -> None:
        self.aspp = ASPP(self.encoder.out_channels[-1], ASPP_RATES[output_stride])
        self.low_level = conv_bn_relu(self.encoder.out_channels[1], LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, ASPP_CHANNELS),
            conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS),
        )
        self.classify = nn.Conv2d(ASPP_CHANNELS, classes, 1)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features[1])
        context = resize_to(self.aspp(features[-1]), low.shape[-2:])
        return self.classify(self.fuse(torch.cat([context, low], dim=1)))


@register_model(
    "deeplabv3",
    title="DeepLabv3 (Chen et al. 2017): dilated ResNet + ASPP with image pooling",
    backbones=RESNETS,
    default_backbone="resnet50",
)
def deeplabv3(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    output_stride: int = 8,
    aux: bool = False,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> DeepLabV3:
    """DeepLabv3. `output_stride` 8 (default, as torchvision's deeplabv3_resnet*; ASPP rates
    12/24/36) or 16 (rates 6/12/18, about 3x cheaper); `aux` adds torchvision's FCN head on
    layer3 (loss weight 0.5). Default backbone resnet50."""
    check_stride("`output_stride`", output_stride, tuple(ASPP_RATES))
    return DeepLabV3(
        backbone,
        in_channels,
        classes,
        output_stride,
        aux,
        pretrained,
        backbone_weights,
    )


@register_model(
    "deeplabv3p",
    title="DeepLabv3+ (Chen et al. 2018): DeepLabv3 with a layer1 decoder",
    backbones=RESNETS,
    default_backbone="resnet50",
)
def deeplabv3p(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    output_stride: int = 16,
    aux: bool = False,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> DeepLabV3Plus:
    """DeepLabv3+. `output_stride` 16 (default, the paper's training setting; ASPP rates
    6/12/18) or 8 (rates 12/24/36); `aux` adds an FCN head on layer3 (loss weight 0.5). Default
    backbone resnet50."""
    check_stride("`output_stride`", output_stride, tuple(ASPP_RATES))
    return DeepLabV3Plus(
        backbone,
        in_channels,
        classes,
        output_stride,
        aux,
        pretrained,
        backbone_weights,
    )
