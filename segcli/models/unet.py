"""UNet (Ronneberger et al. 2015) on the plain, ResNet and VGG encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segcli.errors import UsageError, choose
from segcli.models.attention import ATTENTION_KINDS, attention_block
from segcli.models.base import SegmentationModel
from segcli.models.blocks import DoubleConv, SegmentationHead, Upsample2x, he_init
from segcli.models.encoders import DOWNSAMPLING, ENCODERS, build_encoder
from segcli.models.registry import register_model

# The published decoder (SPEC.md section 1); `decoder_channels` trades it for a lighter one.
DECODER_WIDTHS = (512, 256, 128, 64)
UPSAMPLING = ("transpose", "bilinear")


def parse_decoder_channels(value: str | Sequence[int] | None) -> tuple[int, int, int, int]:
    """`--decoder-channels`: four widths, deep to shallow, as "256,128,64,32" or a sequence;
    None is the published 512,256,128,64."""
    if value is None:
        return DECODER_WIDTHS
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 4 or any(w < 2 or w % 2 for w in widths):
        raise UsageError(
            f"--decoder-channels '{text}': give four even widths, deep to shallow, "
            "e.g. 256,128,64,32 (published: 512,256,128,64)"
        )
    return widths  # type: ignore[return-value]


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip, DoubleConv, then the optional attention module."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, up: str, attention: str
    ) -> None:
        super().__init__()
        self.up = Upsample2x(in_channels, out_channels, up)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)
        self.attention = attention_block(attention, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, size=skip.shape[-2:])
        return self.attention(self.conv(torch.cat([x, skip], dim=1)))


class UNet(SegmentationModel):
    def __init__(
        self,
        backbone: str,
        in_channels: int,
        classes: int,
        up: str = "transpose",
        down: str = "maxpool",
        attention: str = "none",
        pretrained: bool = False,
        backbone_weights: str | None = None,
        decoder_channels: Sequence[int] = DECODER_WIDTHS,
    ) -> None:
        choose("--up", up, UPSAMPLING)
        choose("--attention", attention, ATTENTION_KINDS)
        encoder = build_encoder(
            backbone,
            in_channels,
            down=down,
            pretrained=pretrained,
            backbone_weights=backbone_weights,
        )
        super().__init__(size_divisor=encoder.reductions[-1])
        self.encoder = encoder
        skips = encoder.out_channels[-2::-1]
        widths = list(decoder_channels)
        widths_in = [encoder.out_channels[-1], *widths[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(w_in, skip, w_out, up, attention)
            for w_in, skip, w_out in zip(widths_in, skips, widths, strict=True)
        )
        self.head = SegmentationHead(widths[-1], classes, encoder.reductions[0])
        he_init(self.decoder, self.head)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for block, skip in zip(self.decoder, features[-2::-1], strict=True):
            y = block(y, skip)
        return self.head(y)


@register_model(
    "unet",
    title="UNet (Ronneberger et al. 2015); ResNet/VGG encoders give ResUNet/TernausNet forms",
    backbones=ENCODERS,
    default_backbone="none",
)
def unet(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    up: str = "transpose",
    down: str = "maxpool",
    attention: str = "none",
    pretrained: bool = False,
    backbone_weights: str | None = None,
    decoder_channels: str | None = None,
) -> UNet:
    """UNet. `up`: transpose | bilinear; `down`: maxpool | conv (UNet-2, plain encoder only);
    `attention`: none | cbam | self after each decoder block; `decoder_channels`: the four
    decoder widths, deep to shallow (None: the published 512,256,128,64)."""
    choose("--down", down, DOWNSAMPLING)
    widths = parse_decoder_channels(decoder_channels)
    return UNet(
        backbone,
        in_channels,
        classes,
        up,
        down,
        attention,
        pretrained,
        backbone_weights,
        widths,
    )
