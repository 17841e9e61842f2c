"""UNet++ (Zhou et al. 2018): nested, densely connected skip pathways."""

from __future__ import annotations

import torch
from torch import nn

from segcli.errors import choose
from segcli.models.attention import ATTENTION_KINDS, attention_block
from segcli.models.base import ModelOutput, SegmentationModel
from segcli.models.blocks import DoubleConv, SegmentationHead, Upsample2x, he_init
from segcli.models.encoders import ENCODERS, build_encoder
from segcli.models.registry import register_model
from segcli.models.unet import DECODER_WIDTHS, UPSAMPLING

LEVEL_WIDTHS = DECODER_WIDTHS[::-1]  # node width per depth, shallow (64) to deep (512)


class NestedNode(nn.Module):
    """Node X(i, j): upsample X(i+1, j-1), concatenate with X(i, 0..j-1), DoubleConv."""

    def __init__(
        self, deeper: int, same_level: int, out_channels: int, up: str, attention: str
    ) -> None:
        super().__init__()
        self.up = Upsample2x(deeper, out_channels, up)
        self.conv = DoubleConv(same_level + out_channels, out_channels)
        self.attention = attention_block(attention, out_channels)

    def forward(self, deeper: torch.Tensor, same_level: list[torch.Tensor]) -> torch.Tensor:
        upsampled = self.up(deeper, size=same_level[0].shape[-2:])
        return self.attention(self.conv(torch.cat([*same_level, upsampled], dim=1)))


class UNetPlusPlus(SegmentationModel):
    def __init__(
        self,
        backbone: str,
        in_channels: int,
        classes: int,
        up: str,
        attention: str,
        deep_supervision: bool,
        pretrained: bool,
        backbone_weights: str | None,
    ) -> None:
        encoder = build_encoder(
            backbone, in_channels, pretrained=pretrained, backbone_weights=backbone_weights
        )
        super().__init__(size_divisor=encoder.reductions[-1])
        self.encoder = encoder
        self.deep_supervision = deep_supervision
        depth = len(encoder.out_channels) - 1

        def width(level: int, column: int) -> int:
            return encoder.out_channels[level] if column == 0 else LEVEL_WIDTHS[level]

        # nodes[f"{i}_{j}"] is X(i, j) for j >= 1; X(i, 0) are the encoder features.
        self.nodes = nn.ModuleDict()
        for column in range(1, depth + 1):
            for level in range(depth - column + 1):
                same_level = sum(width(level, c) for c in range(column))
                self.nodes[f"{level}_{column}"] = NestedNode(
                    width(level + 1, column - 1), same_level, LEVEL_WIDTHS[level], up, attention
                )
        head_count = depth if deep_supervision else 1
        self.heads = nn.ModuleList(
            SegmentationHead(LEVEL_WIDTHS[0], classes, encoder.reductions[0])
            for _ in range(head_count)
        )
        he_init(self.nodes, self.heads)

    def forward_padded(self, x: torch.Tensor) -> ModelOutput:
        features = self.encoder(x)
        depth = len(features) - 1
        grid: list[list[torch.Tensor]] = [[feature] for feature in features]
        for column in range(1, depth + 1):
            for level in range(depth - column + 1):
                node = self.nodes[f"{level}_{column}"]
                grid[level].append(node(grid[level + 1][column - 1], grid[level]))
        out = self.heads[-1](grid[0][depth])
        if not (self.training and self.deep_supervision):
            return out
        aux = [head(grid[0][column]) for column, head in enumerate(self.heads[:-1], start=1)]
        return {"out": out, "aux": aux}


@register_model(
    "unetpp",
    title="UNet++ (Zhou et al. 2018): nested dense skip pathways",
    backbones=ENCODERS,
    default_backbone="none",
)
def unetpp(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    up: str = "transpose",
    attention: str = "none",
    deep_supervision: bool = False,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> UNetPlusPlus:
    """UNet++. `deep_supervision` adds heads on X(0,1..3) whose outputs are returned in
    training mode; the final head on X(0,4) gives the prediction."""
    choose("`up`", up, UPSAMPLING)
    choose("`attention`", attention, ATTENTION_KINDS)
    return UNetPlusPlus(
        backbone,
        in_channels,
        classes,
        up,
        attention,
        deep_supervision,
        pretrained,
        backbone_weights,
    )
