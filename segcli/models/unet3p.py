"""UNet 3+ (Huang et al. 2020): full-scale skip connections, deep supervision and a
classification-guided module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.errors import choose
from segcli.models.attention import ATTENTION_KINDS, attention_block
from segcli.models.base import ModelOutput, SegmentationModel
from segcli.models.blocks import SegmentationHead, conv_bn_relu, he_init, resize_to
from segcli.models.encoders import ENCODERS, build_encoder
from segcli.models.registry import register_model

CAT_CHANNELS = 64
# How far below every other class a suppressed class's logit is put: e^-20 of the probability
# mass, never the argmax, yet a wrong gate costs a loss of about 20, not 1e4, so validation
# losses and curves keep a readable scale.
SUPPRESSED_MARGIN = 20.0


class FullScaleStage(nn.Module):
    """Decoder stage at one level: every encoder level at or above it (max-pooled down),
    every decoder level below it (bilinearly upsampled), each mapped to 64 channels by a 3x3
    conv, concatenated to 5 x 64 = 320 channels and fused by one more 3x3 conv."""

    def __init__(self, level: int, source_channels: list[int], attention: str) -> None:
        super().__init__()
        self.level = level
        self.branches = nn.ModuleList(conv_bn_relu(c, CAT_CHANNELS) for c in source_channels)
        fused = CAT_CHANNELS * len(source_channels)
        self.fuse = conv_bn_relu(fused, fused)
        self.attention = attention_block(attention, fused)

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        size = sources[self.level].shape[-2:]
        parts = []
        for index, (branch, source) in enumerate(zip(self.branches, sources, strict=True)):
            if index < self.level:
                factor = 2 ** (self.level - index)
                source = F.max_pool2d(source, factor, factor)
            elif index > self.level:
                source = resize_to(source, size)
            parts.append(branch(source))
        return self.attention(self.fuse(torch.cat(parts, dim=1)))


class UNet3Plus(SegmentationModel):
    def __init__(
        self,
        backbone: str,
        in_channels: int,
        classes: int,
        attention: str,
        deep_supervision: bool,
        cgm: bool,
        pretrained: bool,
        backbone_weights: str | None,
    ) -> None:
        encoder = build_encoder(
            backbone, in_channels, pretrained=pretrained, backbone_weights=backbone_weights
        )
        super().__init__(size_divisor=encoder.reductions[-1])
        self.encoder = encoder
        self.deep_supervision = deep_supervision
        levels = len(encoder.out_channels)
        fused = CAT_CHANNELS * levels
        # Sources of the stage at `level`: encoder levels 0..level, decoder stages below it
        # (320 channels), and the deepest encoder level in place of a decoder stage.
        self.stages = nn.ModuleList()
        for level in range(levels - 2, -1, -1):
            channels = list(encoder.out_channels[: level + 1])
            channels += [fused] * (levels - 2 - level) + [encoder.out_channels[-1]]
            self.stages.append(FullScaleStage(level, channels, attention))
        self.head = SegmentationHead(fused, classes, encoder.reductions[0])
        he_init(self.stages, self.head)
        if deep_supervision:
            side = [fused] * (levels - 2) + [encoder.out_channels[-1]]
            self.side_heads = nn.ModuleList(nn.Conv2d(c, classes, 3, padding=1) for c in side)
        self.classifier = None
        if cgm:
            self.classifier = nn.Sequential(
                nn.Dropout(0.5),
                nn.Conv2d(encoder.out_channels[-1], classes, 1),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
            )

    def forward_padded(self, x: torch.Tensor) -> ModelOutput:
        features = self.encoder(x)
        deepest = features[-1]
        decoded: list[torch.Tensor] = []  # deepest stage first
        for stage in self.stages:
            sources = features[: stage.level + 1] + decoded[::-1] + [deepest]
            decoded.append(stage(sources))
        out = self.head(decoded[-1])
        presence = self.classifier(deepest) if self.classifier is not None else None
        if self.training and (self.deep_supervision or presence is not None):
            result: dict[str, object] = {"out": out, "aux": []}
            if self.deep_supervision:
                sides = [*decoded[-2::-1], deepest]  # shallow to deep, as side_heads
                result["aux"] = [
                    resize_to(head(side), x.shape[-2:])
                    for head, side in zip(self.side_heads, sides, strict=True)
                ]
            if presence is not None:
                result["cls"] = presence
            return result
        if presence is not None:
            out = self._gate(out, presence)
        return out

    @staticmethod
    def _gate(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Switch off classes the classification branch says are absent: their logits go
        SUPPRESSED_MARGIN below the smallest logit of the pixel (a one-logit model's below
        -SUPPRESSED_MARGIN). Background (class 0 of a multiclass model) is never switched off,
        so every pixel keeps a valid class."""
        absent = (presence < 0)[:, :, None, None]
        if logits.shape[1] > 1:
            absent = torch.cat([torch.zeros_like(absent[:, :1]), absent[:, 1:]], dim=1)
            floor = logits.amin(dim=1, keepdim=True) - SUPPRESSED_MARGIN
        else:
            floor = torch.clamp(logits, max=-SUPPRESSED_MARGIN)
        return torch.where(absent, torch.minimum(logits, floor), logits)


@register_model(
    "unet3p",
    title="UNet 3+ (Huang et al. 2020): full-scale skips, 5 x 64 = 320-channel decoder",
    backbones=ENCODERS,
    default_backbone="none",
)
def unet3p(
    *,
    backbone: str,
    in_channels: int,
    classes: int,
    attention: str = "none",
    deep_supervision: bool = False,
    cgm: bool = False,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> UNet3Plus:
    """UNet 3+. `deep_supervision` returns a side output of every decoder stage and the
    deepest encoder level in training; `cgm` adds the classification-guided module, whose
    class-presence logits train with BCE and gate the prediction at inference."""
    choose("`attention`", attention, ATTENTION_KINDS)
    return UNet3Plus(
        backbone,
        in_channels,
        classes,
        attention,
        deep_supervision,
        cgm,
        pretrained,
        backbone_weights,
    )
