"""UNet (Ronneberger et al. 2015) on the plain, ResNet and VGG encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcli.errors import UsageError, choose
from segcli.models.attention import ATTENTION_KINDS, attention_block
from segcli.models.base import ModelOutput, SegmentationModel
from segcli.models.blocks import DoubleConv, SegmentationHead, Upsample2x, he_init, resize_to
from segcli.models.encoders import DOWNSAMPLING, ENCODERS, build_encoder
from segcli.models.registry import register_model

UPSAMPLING = ("transpose", "bilinear")
# UNet alone also takes `nearest`: interpolation without a channel projection, so each block's
# DoubleConv sees the whole upsampled map beside its skip.
UNET_UPSAMPLING = (*UPSAMPLING, "nearest")

# Named decoders: widths deep to shallow, and the upsampling each uses unless `--up` is given.
# `published` is the ResUNet of the parameter table. `fast` (the default on ResNet encoders)
# costs 0.58x its FLOPs (5.4 against 9.3 GMAC for a ResUNet18 at 256x256) and adds a fifth
# block at full resolution; it trained to a better val mIoU per CPU-minute on
# stanford_background (README, "Accuracy per CPU-minute").
DECODERS = {
    "published": ((512, 256, 128, 64), "transpose"),
    "fast": ((256, 128, 64, 32, 16), "nearest"),
}
DECODER_WIDTHS = DECODERS["published"][0]
# Deep supervision: 1x1 side heads on the decoder outputs at these fractions of the input,
# each trained with `aux_weight` x the loss (measured in the README's "Accuracy per
# CPU-minute"; the coarse 1/16 and the near-final 1/2 outputs were not tried).
SIDE_OUTPUT_REDUCTIONS = (8, 4)


def parse_decoder_channels(value: str | Sequence[int]) -> tuple[int, ...]:
    """`--decoder-channels`: a named decoder (published, fast) or four widths, deep to shallow,
    as "256,128,64,32" or a sequence, or five, the fifth being a block at full resolution
    without a skip (encoders whose shallowest tap is at 1/2)."""
    if isinstance(value, str) and value in DECODERS:
        return DECODERS[value][0]
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) not in (4, 5) or any(w < 2 or w % 2 for w in widths):
        raise UsageError(
            f"`decoder_channels` '{text}': give {' or '.join(DECODERS)}, or four or five even "
            "widths, deep to shallow, e.g. 256,128,64,32,16"
        )
    return widths


def default_decoder(backbone: str) -> str:
    """ResNet encoders (shallowest tap at 1/2) get the fast decoder; the plain and VGG
    encoders, whose shallowest tap is at full resolution, keep the published one."""
    return "fast" if backbone.startswith("resnet") else "published"


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), DoubleConv, then the optional attention."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, up: str, attention: str
    ) -> None:
        super().__init__()
        if up == "nearest":
            self.up = None
            upsampled = in_channels
        else:
            self.up = Upsample2x(in_channels, out_channels, up)
            upsampled = out_channels
        self.conv = DoubleConv(upsampled + skip_channels, out_channels)
        self.attention = attention_block(attention, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        # A scale factor, not a size computed from x.shape, keeps exported graphs dynamic.
        if self.up is None:
            if skip is None:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        else:
            x = self.up(x, size=skip.shape[-2:] if skip is not None else None)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.attention(self.conv(x))


class UNet(SegmentationModel):
    aux_weight = 0.2  # per side output (`deep_supervision`): 0.4 for the two

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
        deep_supervision: bool = False,
    ) -> None:
        choose("`up`", up, UNET_UPSAMPLING)
        choose("`attention`", attention, ATTENTION_KINDS)
        encoder = build_encoder(
            backbone,
            in_channels,
            down=down,
            pretrained=pretrained,
            backbone_weights=backbone_weights,
        )
        super().__init__(size_divisor=encoder.reductions[-1])
        self.encoder = encoder
        skips = list(encoder.out_channels[-2::-1])
        widths = list(decoder_channels)
        reduction = encoder.reductions[0]
        full_resolution_block = len(widths) == len(skips) + 1
        if full_resolution_block:
            if reduction != 2:
                raise UsageError(
                    f"`decoder_channels`: a fifth width adds a full-resolution block, but "
                    f"`backbone` {backbone} has its shallowest features at 1/{reduction} "
                    "already; give four widths"
                )
            skips.append(0)
            reduction = 1
        widths_in = [encoder.out_channels[-1], *widths[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(w_in, skip, w_out, up, attention)
            for w_in, skip, w_out in zip(widths_in, skips, widths, strict=True)
        )
        self.head = SegmentationHead(widths[-1], classes, reduction, context=full_resolution_block)
        he_init(self.decoder, self.head)
        # Output reduction of each decoder block: that of the skip it joins, 1 for the fifth.
        block_reductions = [*encoder.reductions[-2::-1], 1][: len(widths)]
        self.side_blocks = [
            index
            for index, block_reduction in enumerate(block_reductions)
            if deep_supervision and block_reduction in SIDE_OUTPUT_REDUCTIONS
        ]
        self.side_heads = nn.ModuleList(
            nn.Conv2d(widths[index], classes, 1) for index in self.side_blocks
        )

    def forward_padded(self, x: torch.Tensor) -> ModelOutput:
        features = self.encoder(x)
        skips = features[-2::-1]
        y = features[-1]
        sides = []
        for index, block in enumerate(self.decoder):
            y = block(y, skips[index] if index < len(skips) else None)
            if self.training and index in self.side_blocks:
                sides.append(y)
        out = self.head(y)
        if not sides:
            return out
        heads = self.side_heads
        aux = [resize_to(head(side), x.shape[-2:]) for head, side in zip(heads, sides, strict=True)]
        return {"out": out, "aux": aux}


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
    up: str | None = None,
    down: str = "maxpool",
    attention: str | None = None,
    pretrained: bool = False,
    backbone_weights: str | None = None,
    decoder_channels: str | None = None,
    deep_supervision: bool = False,
) -> UNet:
    """UNet. `up`: transpose | bilinear | nearest (None: the decoder's own); `down`: maxpool |
    conv (UNet-2, plain encoder only); `attention`: none | cbam | self after each decoder block
    (None: cbam with the fast decoder, none otherwise);
    `decoder_channels`: published | fast | four or five widths, deep to shallow (None: fast on
    ResNet encoders, published otherwise); `deep_supervision`: side outputs at 1/8 and 1/4
    trained with the main one (training only: inference and export use the main head). The
    model's `build_config` records the resolved decoder, upsampling and attention, so a
    checkpoint rebuilds the same model whatever the defaults."""
    choose("`down`", down, DOWNSAMPLING)
    decoder = decoder_channels if decoder_channels is not None else default_decoder(backbone)
    widths = parse_decoder_channels(decoder)
    if up is None:
        up = DECODERS[decoder][1] if decoder in DECODERS else "transpose"
    if attention is None:
        attention = "cbam" if decoder == "fast" else "none"
    model = UNet(
        backbone,
        in_channels,
        classes,
        up,
        down,
        attention,
        pretrained,
        backbone_weights,
        widths,
        deep_supervision,
    )
    model.resolved_options = {
        "up": up,
        "attention": attention,
        "decoder_channels": ",".join(map(str, widths)),
    }
    return model
