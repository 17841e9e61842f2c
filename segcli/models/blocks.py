"""Building blocks shared by the architectures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def he_init(*modules: nn.Module) -> None:
    """He initialisation for the layers segcli builds itself (torchvision already initialises
    its encoders so): convolutions get kaiming-uniform with fan-in for ReLU, and transposed
    convolutions a normal of variance 1 / (taps per output pixel), so upsampled deep features
    enter each concatenation at the scale of the skip beside them. PyTorch's default
    (kaiming-uniform with a = sqrt(5), fan-in counted on the wrong axis for transposed
    convolutions) shrank the deep path to 0.2-0.5x the skip at every decoder level: a ResUNet18
    on stanford_background ended 4 epochs at train loss 0.924 instead of 0.876 (README,
    "Accuracy per CPU-minute"). Modules with an `open_gates()` (CBAM) get it called last, so
    their gates start open rather than as a He-initialised random mask."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.ConvTranspose2d):
                kernel_h, kernel_w = layer.kernel_size
                stride_h, stride_w = layer.stride
                taps = layer.in_channels // layer.groups
                taps *= max(1, kernel_h // stride_h) * max(1, kernel_w // stride_w)
                nn.init.normal_(layer.weight, 0.0, math.sqrt(1.0 / taps))
            elif isinstance(layer, nn.Conv2d):
                nn.init.kaiming_uniform_(layer.weight, mode="fan_in", nonlinearity="relu")
            else:
                continue
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        for layer in module.modules():
            if hasattr(layer, "open_gates"):
                layer.open_gates()


class AtrousConv2d(nn.Conv2d):
    """A dilated 'same' convolution (stride 1, one group) that, in bf16 or fp16 on CPU, runs as
    one 1x1 convolution per kernel tap over the region where that tap lands inside the image,
    summed. The result is the same convolution; the reasons are speed: oneDNN's dilated
    reduced-precision kernels ran DeepLabv3's ASPP branches (2048 -> 256 channels at 64x64,
    rates 12/24/36) at 173-305 ms each on a 2-core AMX Xeon against 37-77 ms this way, and at
    large rates most taps fall on the zero padding, which this way skips (at rate 36 on a 64x64
    map, 61% of the multiply-adds). fp32 and other devices keep the dilated kernel, which was
    as fast or faster there. Weights and state-dict keys are nn.Conv2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if x.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x)
        height, width = x.shape[-2:]
        # The taps' partial sums add up in fp32, as the dilated kernel accumulates them.
        out = x.new_zeros((x.shape[0], self.out_channels, height, width), dtype=torch.float32)
        kernel_h, kernel_w = self.kernel_size
        for i in range(kernel_h):
            dy = i * self.dilation[0] - self.padding[0]
            for j in range(kernel_w):
                dx = j * self.dilation[1] - self.padding[1]
                if abs(dy) >= height or abs(dx) >= width:
                    continue  # this tap only ever reads padding
                source = x[..., max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)]
                tap = self.weight[:, :, i : i + 1, j : j + 1]
                out[..., max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] += (
                    F.conv2d(source, tap)
                )
        if self.bias is not None:
            out += self.bias.float()[:, None, None]
        return out.to(dtype)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv (no bias, BatchNorm follows) + BatchNorm + ReLU with 'same' padding."""
    padding = dilation * (kernel_size - 1) // 2
    atrous = dilation > 1 and stride == 1 and kernel_size % 2 == 1
    conv = AtrousConv2d if atrous else nn.Conv2d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers: 9·in·out + 9·out² + 4·out parameters (the convs have no
    bias; each BatchNorm has a weight and a bias per channel)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )


class Upsample2x(nn.Module):
    """Doubles the resolution and maps channels: a 2x2 stride-2 transposed conv (`transpose`),
    or bilinear interpolation followed by a 1x1 conv (`bilinear`, fewer checkerboard artefacts)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "transpose") -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.proj = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
        else:
            self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        target = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.proj(F.interpolate(x, size=target, mode="bilinear", align_corners=False))


class SegmentationHead(nn.Module):
    """Maps decoder features to class logits at full resolution.

    Features at 1/2 resolution (ResNet encoders) go through a 2x2 stride-2 transposed conv
    64->32 with bias first, then a 1x1 conv without bias (the published ResUNet head);
    full-resolution features get the 1x1 conv only. `context=True` makes the classifier a 3x3
    conv with bias: behind UNet's thin full-resolution block it trained a ResUNet18 to a lower
    loss (0.906 against 0.981 after 4 epochs on stanford_background, val mIoU 0.469 against
    0.449)."""

    def __init__(
        self, in_channels: int, classes: int, reduction: int, context: bool = False
    ) -> None:
        super().__init__()
        if reduction == 1:
            self.up = nn.Identity()
            head_in = in_channels
        elif reduction == 2:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2, bias=True)
            head_in = in_channels // 2
        else:
            raise ValueError(f"a segmentation head takes features at 1/1 or 1/2, not 1/{reduction}")
        if context:
            self.classify = nn.Conv2d(head_in, classes, 3, padding=1, bias=True)
        else:
            self.classify = nn.Conv2d(head_in, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.up(x))


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of logits or features to `size` (a no-op when it already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
