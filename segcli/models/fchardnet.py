"""FC-HarDNet-70 (Chao et al. 2019): a harmonic densely connected encoder-decoder, laid out as in
the authors' reference implementation (4,119,257 parameters at 19 classes, the published count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.models.base import SegmentationModel
from segcli.models.blocks import conv_bn_relu
from segcli.models.registry import register_model

STEM_CHANNELS = (16, 24, 32, 48)
GROWTH = (10, 16, 18, 24, 32)
LAYERS = (4, 4, 8, 8, 8)
TRANSITIONS = (64, 96, 160, 224, 320)
MULTIPLIER = 1.7


def harmonic_links(layer: int) -> list[int]:
    """Layer k (1-based; 0 is the block input) reads layers k - 2^n for every 2^n dividing k."""
    return [layer - 2**n for n in range(layer.bit_length()) if layer % 2**n == 0]


def harmonic_width(layer: int, growth: int) -> int:
    """growth x 1.7^m, m = number of links beyond the first, rounded to an even count."""
    width = growth * MULTIPLIER ** (len(harmonic_links(layer)) - 1)
    return int(int(width + 1) / 2) * 2


class HarDBlock(nn.Module):
    """Outputs the concatenation of the odd layers and the last one (not the block input)."""

    def __init__(self, in_channels: int, growth: int, layers: int) -> None:
        super().__init__()
        widths = [in_channels] + [harmonic_width(k, growth) for k in range(1, layers + 1)]
        self.links = [harmonic_links(k) for k in range(1, layers + 1)]
        self.layers = nn.ModuleList(
            conv_bn_relu(sum(widths[i] for i in links), widths[k])
            for k, links in enumerate(self.links, start=1)
        )
        self.outputs = [k for k in range(1, layers + 1) if k % 2 == 1 or k == layers]
        self.out_channels = sum(widths[k] for k in self.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for layer, links in zip(self.layers, self.links, strict=True):
            maps.append(layer(torch.cat([maps[i] for i in links], dim=1)))
        return torch.cat([maps[k] for k in self.outputs], dim=1)


class UpBlock(nn.Module):
    """Bilinear upsampling to the skip, concatenation, 1x1 conv to half width, HarDBlock."""

    def __init__(self, in_channels: int, skip_channels: int, growth: int, layers: int) -> None:
        super().__init__()
        half = (in_channels + skip_channels) // 2
        self.reduce = conv_bn_relu(in_channels + skip_channels, half, 1)
        self.block = HarDBlock(half, growth, layers)
        self.out_channels = self.block.out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.block(self.reduce(torch.cat([x, skip], dim=1)))


class FCHarDNet(SegmentationModel):
    def __init__(self, in_channels: int, classes: int) -> None:
        # Four 2x average-pools after a 1/4 stem put the deepest block at 1/64.
        super().__init__(size_divisor=64)
        a, b, c, d = STEM_CHANNELS
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, a, stride=2),
            conv_bn_relu(a, b),
            conv_bn_relu(b, c, stride=2),
            conv_bn_relu(c, d),
        )
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        skip_channels = []
        previous = d
        for growth, layers, width in zip(GROWTH, LAYERS, TRANSITIONS, strict=True):
            block = HarDBlock(previous, growth, layers)
            skip_channels.append(block.out_channels)
            self.blocks.append(block)
            self.transitions.append(conv_bn_relu(block.out_channels, width, 1))
            previous = width
        self.ups = nn.ModuleList()
        for skip, growth, layers in zip(
            skip_channels[-2::-1], GROWTH[-2::-1], LAYERS[-2::-1], strict=True
        ):
            up = UpBlock(previous, skip, growth, layers)
            self.ups.append(up)
            previous = up.out_channels
        self.classify = nn.Conv2d(previous, classes, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        skips = []
        for index, (block, transition) in enumerate(
            zip(self.blocks, self.transitions, strict=True)
        ):
            if index > 0:
                y = F.avg_pool2d(y, 2)
            y = block(y)
            skips.append(y)
            y = transition(y)
        for up, skip in zip(self.ups, skips[-2::-1], strict=True):
            y = up(y, skip)
        logits = self.classify(y)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


@register_model(
    "fchardnet",
    title="FC-HarDNet-70 (Chao et al. 2019): harmonic densely connected encoder-decoder",
    backbones=("hardnet70",),
    default_backbone="hardnet70",
)
def fchardnet(*, backbone: str, in_channels: int, classes: int) -> FCHarDNet:
    """FC-HarDNet-70, trained from scratch (no ImageNet weights ship with torchvision)."""
    return FCHarDNet(in_channels, classes)
