"""`seg params`: parameter counts (and FLOPs) of the published table or of one model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from segcli.cli._options import (
    MODEL_OPTION_NAMES,
    Attention,
    Aux,
    Backbone,
    Cgm,
    Classes,
    DecoderChannels,
    DeepSupervision,
    Down,
    FcWidth,
    InChannels,
    Json,
    OutputStride,
    Stride,
    Up,
    model_options,
)


def params(
    arch: Annotated[
        str | None, typer.Argument(help="Architecture; omit for the published table.")
    ] = None,
    backbone: Backbone = None,
    classes: Classes = 1,
    in_channels: InChannels = 3,
    up: Up = None,
    down: Down = None,
    attention: Attention = None,
    deep_supervision: DeepSupervision = None,
    cgm: Cgm = None,
    output_stride: OutputStride = None,
    aux: Aux = None,
    stride: Stride = None,
    fc_width: FcWidth = None,
    decoder_channels: DecoderChannels = None,
    flops: Annotated[bool, typer.Option("--flops", help="Add forward GFLOPs per image.")] = False,
    size: Annotated[str, typer.Option(help="Input size for --flops: N or HxW.")] = "512",
    json_output: Json = False,
) -> None:
    """Count parameters of the published table, or of one model with its options.

    With no ARCH: the UNet / ResUNet rows of the published table, then every other
    architecture at its default backbone. Counts are exact `numel()` sums over parameters
    (BatchNorm buffers excluded); models are built on the meta device, so this is fast."""
    from rich.console import Console
    from rich.table import Table

    from segcli.data import parse_size
    from segcli.models import summary

    flops_size = parse_size(size) if flops else None
    given = locals()
    options = model_options(**{name: given[name] for name in MODEL_OPTION_NAMES})
    if arch is None:
        if backbone is not None or options:
            from segcli.errors import UsageError

            raise UsageError("--backbone and model options need an ARCH (e.g. seg params unet)")
        rows = summary.parameter_table(
            in_channels=in_channels, classes=classes, flops_size=flops_size
        )
    else:
        rows = [
            summary.describe(
                arch,
                arch,
                backbone,
                in_channels=in_channels,
                classes=classes,
                flops_size=flops_size,
                **options,
            )
        ]

    if json_output:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    table = Table(title=f"Parameters (in_channels={in_channels}, classes={classes})")
    for column in ("model", "arch", "backbone", "params", "millions"):
        table.add_column(column, justify="right" if column in ("params", "millions") else "left")
    if flops_size:
        table.add_column(f"GFLOPs @{flops_size[0]}x{flops_size[1]}", justify="right")
    for row in rows:
        cells = [row.name, row.arch, row.backbone, f"{row.params:,}", row.millions]
        if row.gflops is not None:
            cells.append(f"{row.gflops:.1f}")
        table.add_row(*cells)
    Console().print(table)
