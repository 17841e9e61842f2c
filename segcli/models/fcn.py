"""FCN (Long et al. 2015): FCN-32s/16s/8s on VGG, and torchvision's FCN on dilated ResNets.

VGG form: pool5 -> fc6 (7x7 conv, `fc_width` channels, 4096 in the paper) -> fc7 (1x1) -> class
scores at 1/32. FCN-16s adds scores from pool4 after a learnt 2x upsampling, FCN-8s also pool3;
a final learnt upsampling returns to full size. Every upsampling is a transposed conv with kernel
2s, stride s and padding s/2 (exactly s times the size) initialised to bilinear interpolation.
The input is padded to a multiple of 32, so there is none of the paper's pad-100-and-crop.
fc6/fc7 start random: the ImageNet weights cover the convolutional layers only.

ResNet form: torchvision's fcn_resnet50/101 (FCNHead on layer4, optional aux FCNHead on layer3,
bilinear upsampling), whose state dict maps onto ours by renaming `backbone.` -> `encoder.body.`,
`classifier.` -> `head.`, `aux_classifier.` -> `aux_head.`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.errors import UsageError
from segcli.models.base import SegmentationModel
from segcli.models.dilated import DilatedResNetModel, FCNHead, check_stride
from segcli.models.encoders import VGGS, build_encoder
from segcli.models.registry import register_model

FCN_RESNETS = ("resnet50", "resnet101")
STRIDES = (8, 16, 32)


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A per-channel transposed conv that starts out as bilinear upsampling by `factor`."""
    kernel_size = 2 * factor
    up = nn.ConvTranspose2d(
        channels, channels, kernel_size, stride=factor, padding=factor // 2, bias=False
    )
    centre = factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - centre).abs() / factor
    kernel = taps[:, None] * taps[None, :]
    with torch.no_grad():
        up.weight.zero_()
        up.weight[range(channels), range(channels)] = kernel
    return up


def zero_init_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 scoring conv starting at zero, so a skip branch begins by adding nothing to the
    coarser prediction (the paper's initialisation for FCN-16s/8s)."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCNVGG(SegmentationModel):
    def __init__(
        self,
        backbone: str,
        in_channels: int,
        classes: int,
        stride: int,
        fc_width: int,
        pretrained: bool,
        backbone_weights: str | None,
    ) -> None:
        super().__init__(size_divisor=32)
        self.stride = stride
        self.encoder = build_encoder(
            backbone, in_channels, pretrained=pretrained, backbone_weights=backbone_weights
        )
        pool3_channels, pool4_channels, pool5_channels = self.encoder.out_channels[2:]
        self.fc = nn.Sequential(
            nn.Conv2d(pool5_channels, fc_width, 7, padding=3),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(fc_width, fc_width, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        self.score = nn.Conv2d(fc_width, classes, 1)
        if stride <= 16:
            self.up_to_pool4 = bilinear_upsampling(classes, 2)
            self.score_pool4 = zero_init_conv(pool4_channels, classes)
        if stride == 8:
            self.up_to_pool3 = bilinear_upsampling(classes, 2)
            self.score_pool3 = zero_init_conv(pool3_channels, classes)
        self.up_to_input = bilinear_upsampling(classes, stride)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        # The encoder taps precede each max-pool; pool3..pool5 are those taps pooled.
        taps = self.encoder(x)
        pool3, pool4, pool5 = (F.max_pool2d(t, 2) for t in taps[2:])
        scores = self.score(self.fc(pool5))
        if self.stride <= 16:
            scores = self.up_to_pool4(scores) + self.score_pool4(pool4)
        if self.stride == 8:
            scores = self.up_to_pool3(scores) + self.score_pool3(pool3)
        return self.up_to_input(scores)


class FCNResNet(DilatedResNetModel):
    def build_head(self, classes: int, output_stride: int) -> None:
        self.head = FCNHead(self.encoder.out_channels[-1], classes)


@register_model(
    "fcn",
    title="FCN (Long et al. 2015): FCN-32s/16s/8s on VGG, torchvision's FCN on ResNet-50/101",
    backbones=(*VGGS, *FCN_RESNETS),
    default_backbone="vgg16",
)
def fcn(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    stride: int = 8,
    fc_width: int = 4096,
    aux: bool = False,
    output_stride: int | None = None,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> FCNVGG | FCNResNet:
    """FCN. `stride`: on VGG, 32, 16 or 8 for FCN-32s/16s/8s (default 8). `output_stride`: on
    ResNet, the stride of the dilated backbone, as for DeepLab and PSPNet (8, torchvision's, by
    default; 16 or 32 are cheaper); checkpoints written before it existed stored it as `stride`.
    `fc_width`: fc6/fc7 channels on VGG (4096 as in the paper, about 120M parameters; 1024 is a
    light variant). `aux`: ResNet only, torchvision's FCN head on layer3 (loss weight 0.5).
    Default backbone vgg16."""
    check_stride("`stride`", stride, STRIDES)
    if backbone in FCN_RESNETS:
        dilation = check_stride(
            "`output_stride`", output_stride if output_stride is not None else stride, STRIDES
        )
        return FCNResNet(
            backbone, in_channels, classes, dilation, aux, pretrained, backbone_weights
        )
    if output_stride is not None:
        raise UsageError(
            "`output_stride` applies to fcn on ResNet backbones; FCN-VGG takes `stride` 32|16|8"
        )
    if aux:
        raise UsageError("`aux` applies to fcn on ResNet backbones; FCN-VGG has no auxiliary head")
    if fc_width < 1:
        raise UsageError(f"`fc_width` must be at least 1, not {fc_width}")
    return FCNVGG(backbone, in_channels, classes, stride, fc_width, pretrained, backbone_weights)
