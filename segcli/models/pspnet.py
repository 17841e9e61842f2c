"""PSPNet (Zhao et al. 2017): a dilated ResNet, a pyramid pooling module with bins 1, 2, 3 and 6,
and the auxiliary FCN head on layer3 that the paper trains with weight 0.4."""

from __future__ import annotations

import torch
from torch import nn

from segcli.models.blocks import conv_bn_relu, resize_to
from segcli.models.dilated import DilatedResNetModel, check_stride
from segcli.models.encoders import RESNETS
from segcli.models.registry import register_model

PYRAMID_BINS = (1, 2, 3, 6)
HEAD_CHANNELS = 512


class PyramidPooling(nn.Module):
    """Average-pools to each bin grid, reduces to in/4 channels, upsamples, and concatenates the
    branches with the input (2 x in channels out)."""

    def __init__(self, in_channels: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, branch_channels, 1))
            for b in bins
        )
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize_to(branch(x), size) for branch in self.branches)], dim=1)


class PSPNet(DilatedResNetModel):
    aux_weight = 0.4
    min_train_batch = 2  # the 1x1 pyramid bin

    def build_head(self, classes: int, output_stride: int) -> None:
        pyramid = PyramidPooling(self.encoder.out_channels[-1], PYRAMID_BINS)
        self.head = nn.Sequential(
            pyramid,
            conv_bn_relu(pyramid.out_channels, HEAD_CHANNELS),
            nn.Dropout(0.1),
            nn.Conv2d(HEAD_CHANNELS, classes, 1),
        )


@register_model(
    "pspnet",
    title="PSPNet (Zhao et al. 2017): dilated ResNet + pyramid pooling (bins 1, 2, 3, 6)",
    backbones=RESNETS,
    default_backbone="resnet50",
)
def pspnet(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    output_stride: int = 8,
    aux: bool = True,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> PSPNet:
    """PSPNet. `output_stride` 8 (default, the paper's) or 16; `aux` (on by default) adds the FCN
    head on layer3 whose loss the engine weights by 0.4 in training. Default backbone resnet50.
    Training needs batches of 2 or more: the 1x1 bin's BatchNorm sees one value per image."""
    check_stride("`output_stride`", output_stride, (8, 16))
    return PSPNet(backbone, in_channels, classes, output_stride, aux, pretrained, backbone_weights)
