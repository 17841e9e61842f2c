"""Encoders: torchvision's ResNet and VGG builders tapped with its feature-extraction tools, and
the classic UNet encoder. Every encoder returns five feature maps, shallow to deep, and says
their channels (`out_channels`) and strides (`reductions`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.feature_extraction import create_feature_extractor

from segcli.errors import UsageError
from segcli.models.blocks import DoubleConv, he_init

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = tuple(f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn"))
ENCODERS = ("none", *RESNETS, *VGGS)
DOWNSAMPLING = ("maxpool", "conv")


class Encoder(nn.Module):
    """A feature extractor with its five taps described."""

    def __init__(self, body: nn.Module, out_channels: Sequence[int], reductions: Sequence[int]):
        super().__init__()
        self.body = body
        self.out_channels = list(out_channels)
        self.reductions = list(reductions)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        return list(features.values()) if isinstance(features, dict) else list(features)


class PlainUNetEncoder(nn.Module):
    """Ronneberger et al.'s contracting path: DoubleConvs 64-128-256-512 and a 1024 centre,
    separated by 2x2 max-pooling or, with `down='conv'`, a learnt 2x2 stride-2 conv."""

    def __init__(self, in_channels: int, widths: Sequence[int], down: str = "maxpool") -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for index, width in enumerate(widths):
            if index > 0:
                if down == "conv":
                    self.downs.append(nn.Conv2d(previous, previous, 2, stride=2, bias=False))
                else:
                    self.downs.append(nn.MaxPool2d(2))
            self.stages.append(DoubleConv(previous, width))
            previous = width
        he_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stages[0](x)]
        for down, stage in zip(self.downs, self.stages[1:], strict=True):
            features.append(stage(down(features[-1])))
        return features


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a stride-2 BasicBlock layer into a dilated stride-1 one by torchvision's rule for
    Bottleneck layers (`replace_stride_with_dilation`, which BasicBlock refuses): the layer's
    first block keeps the previous dilation, every later block takes the new one."""
    for index, block in enumerate(layer):
        block_dilation = previous_dilation if index == 0 else dilation
        for conv, d in ((block.conv1, block_dilation), (block.conv2, block_dilation)):
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _resnet(name: str, output_stride: int) -> nn.Module:
    """torchvision's ResNet `name`, dilated to `output_stride`. The last BatchNorm of every
    residual branch starts at zero (Goyal et al. 2017; timm's default), so each block begins
    as the identity: from scratch a ResUNet18 then learnt faster in its first epochs
    (stanford_background, 2 seeds: +0.026 val mIoU after epoch 2 of 8, +0.011 after epoch 4,
    level at the end). Pretrained weights overwrite it."""
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
    if output_stride not in dilate:
        raise UsageError(f"`output_stride` must be 8, 16 or 32, not {output_stride}")
    flags = dilate[output_stride]
    if name in ("resnet18", "resnet34"):
        net = getattr(tvm, name)(weights=None, zero_init_residual=True)
        dilation = 1
        for layer, flag in zip((net.layer2, net.layer3, net.layer4), flags, strict=True):
            if flag:
                _dilate_basic_layer(layer, dilation, dilation * 2)
                dilation *= 2
        return net
    return getattr(tvm, name)(
        weights=None, zero_init_residual=True, replace_stride_with_dilation=flags
    )


# torchvision's VGG layer configurations by depth.
_VGG_CONFIGS = {"11": "A", "13": "B", "16": "D", "19": "E"}


class _VGGFeatures(nn.Module):
    """torchvision's VGG convolutional part without its 120M-parameter classifier, which an
    encoder never uses: building that cost about 1 s and 0.5 GB per model. `features.N` names
    match torchvision's weights; initialisation is torchvision's (He normal, fan-out)."""

    def __init__(self, name: str) -> None:
        from torchvision.models import vgg

        super().__init__()
        depth = name.removeprefix("vgg").removesuffix("_bn")
        config = vgg.cfgs[_VGG_CONFIGS[depth]]
        self.features = vgg.make_layers(config, batch_norm=name.endswith("_bn"))
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _load_backbone_weights(net: nn.Module, name: str, weights_file: str | None) -> None:
    """Load ImageNet weights: from `weights_file`, else through torchvision's weights API."""
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise UsageError(f"`backbone_weights`: no such file: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        try:
            weights = tvm.get_model_weights(name).DEFAULT
            state = weights.get_state_dict(progress=False)
        except Exception as error:  # network, proxy or cache failures all look different
            raise UsageError(
                f"`pretrained`: could not fetch torchvision's {name} ImageNet weights ({error}); "
                f"download them elsewhere and pass `backbone_weights` FILE"
            ) from None
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise UsageError(
            f"backbone weights do not fit {name}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of an RGB first conv for `in_channels` inputs, its kernels derived from the RGB
    ones (summed for gray, cycled and rescaled for more channels) so pretrained filters keep
    their meaning."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        weight = conv.weight
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            repeats = [weight[:, i % weight.shape[1]] for i in range(in_channels)]
            new.weight.copy_(torch.stack(repeats, dim=1) * weight.shape[1] / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build_encoder(
    name: str,
    in_channels: int = 3,
    *,
    down: str = "maxpool",
    output_stride: int = 32,
    pretrained: bool = False,
    backbone_weights: str | None = None,
) -> Encoder:
    """Build the encoder `name` (one of ENCODERS) for `in_channels` inputs."""
    if name not in ENCODERS:
        raise UsageError(f"unknown backbone '{name}'; valid: {', '.join(ENCODERS)}")
    if down not in DOWNSAMPLING:
        raise UsageError(f"unknown `down` '{down}'; valid: {', '.join(DOWNSAMPLING)}")
    if name != "none" and down != "maxpool":
        raise UsageError("`down` conv applies to the plain UNet encoder only (`backbone` none)")
    if name == "none":
        if pretrained or backbone_weights:
            raise UsageError("`pretrained` needs a ResNet or VGG backbone, not 'none'")
        widths = (64, 128, 256, 512, 1024)
        return Encoder(PlainUNetEncoder(in_channels, widths, down), widths, (1, 2, 4, 8, 16))

    if name in RESNETS:
        net = _resnet(name, output_stride)
    else:
        if output_stride != 32:
            raise UsageError("`output_stride` applies to ResNet backbones only")
        net = _VGGFeatures(name)
    if pretrained or backbone_weights:
        _load_backbone_weights(net, name, backbone_weights)

    if name in RESNETS:
        net.conv1 = adapt_first_conv(net.conv1, in_channels)
        nodes = ["relu", "layer1", "layer2", "layer3", "layer4"]
        wide = name not in ("resnet18", "resnet34")
        channels = (64, 256, 512, 1024, 2048) if wide else (64, 64, 128, 256, 512)
        reductions = [2, 4] + [min(r, output_stride) for r in (8, 16, 32)]
    else:
        net.features[0] = adapt_first_conv(net.features[0], in_channels)
        pools = [i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
        nodes = [f"features.{i - 1}" for i in pools]
        channels = (64, 128, 256, 512, 512)
        reductions = (1, 2, 4, 8, 16)
    body = create_feature_extractor(
        net, return_nodes={node: str(i) for i, node in enumerate(nodes)}
    )
    return Encoder(body, channels, reductions)
