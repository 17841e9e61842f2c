"""Parameter counts and forward FLOPs, computed on the meta device so that even the largest
models cost no memory and no initialisation time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segcli.models.registry import MODELS, build_model, resolve_backbone

# The published parameter table `seg params` reproduces: (row name, architecture, backbone).
PUBLISHED_ROWS = (
    ("UNet", "unet", "none"),
    ("ResUNet18", "unet", "resnet18"),
    ("ResUNet34", "unet", "resnet34"),
    ("ResUNet50", "unet", "resnet50"),
    ("ResUNet101", "unet", "resnet101"),
    ("ResUNet152", "unet", "resnet152"),
)


@dataclass(frozen=True)
class ParamRow:
    name: str
    arch: str
    backbone: str
    classes: int
    in_channels: int
    params: int
    gflops: float | None = None

    @property
    def millions(self) -> str:
        return f"{self.params / 1e6:.2f}M"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "params_m": round(self.params / 1e6, 2)}


def count_parameters(model: nn.Module) -> int:
    """Sum of numel over parameters; BatchNorm running statistics are buffers and not counted."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(
    arch: str, backbone: str | None, in_channels: int, classes: int, **options: object
) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, backbone, in_channels, classes, **options)


def forward_gflops(model: nn.Module, in_channels: int, size: tuple[int, int]) -> float:
    """GFLOPs of one eval-mode forward pass on one image (a multiply-add counts as 2)."""
    device = next(model.parameters()).device
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, in_channels, *size, device=device))
    return counter.get_total_flops() / 1e9


def describe(
    name: str,
    arch: str,
    backbone: str | None,
    *,
    in_channels: int = 3,
    classes: int = 1,
    flops_size: tuple[int, int] | None = None,
    **options: object,
) -> ParamRow:
    """Count one model's parameters (and its GFLOPs at `flops_size` when given)."""
    backbone = resolve_backbone(arch, backbone)
    model = build_on_meta(arch, backbone, in_channels, classes, **options)
    gflops = forward_gflops(model, in_channels, flops_size) if flops_size else None
    return ParamRow(name, arch, backbone, classes, in_channels, count_parameters(model), gflops)


def parameter_table(
    *, in_channels: int = 3, classes: int = 1, flops_size: tuple[int, int] | None = None
) -> list[ParamRow]:
    """The published UNet/ResUNet rows (published decoder), the default ResUNet18 (fast
    decoder), then every other architecture at its default backbone."""
    common = {"in_channels": in_channels, "classes": classes, "flops_size": flops_size}
    rows = [
        describe(name, arch, backbone, decoder_channels="published", **common)
        for name, arch, backbone in PUBLISHED_ROWS
    ]
    # What `seg train unet --backbone resnet18` builds by default, beside the published row.
    rows.append(describe("ResUNet18 (fast decoder)", "unet", "resnet18", **common))
    for arch in MODELS:
        if arch != "unet":
            rows.append(
                describe(
                    arch,
                    arch,
                    None,
                    in_channels=in_channels,
                    classes=classes,
                    flops_size=flops_size,
                )
            )
    return rows
