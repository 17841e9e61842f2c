"""`seg export`: a checkpoint to ONNX, TorchScript or an ExportedProgram, checked against
PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.cli._options import Json


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint from seg train.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="onnx | torchscript | exported-program.")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file; default beside the checkpoint."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    dynamic: Annotated[
        bool | None,
        typer.Option(
            "--dynamic/--static",
            help="Free batch, height and width, or fixed to --size and batch 1. Default: "
            "dynamic, except torchscript (traced, static only).",
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="Example input size N or HxW; default the checkpoint's input size."),
    ] = None,
    check: Annotated[
        bool | None,
        typer.Option(
            "--check/--no-check",
            help="Run the exported model on random input and on a decoded image through "
            "seg predict's path, and compare with PyTorch (max abs logit difference must be "
            "below 1e-3). Default: on when the runtime is installed.",
        ),
    ] = None,
    check_image: Annotated[
        Path | None,
        typer.Option(
            "--check-image",
            help="An image of yours for the check's decoded-image part [default: a generated "
            "one 1.5x the model size].",
        ),
    ] = None,
    json_output: Json = False,
) -> None:
    """Export a checkpoint's model (CPU, eval mode, fp32).

    ONNX files have input `images`, output `logits`, and the checkpoint's classes, mean/std
    and input size in their metadata (key `segcli`). A check that fails exits 1 and writes no
    file."""
    from segcli.checkpoint import load_model
    from segcli.data import parse_size
    from segcli.errors import choose
    from segcli.export import FORMATS, default_output, export_model

    choose("--format", format, FORMATS)
    model, info = load_model(checkpoint, "cpu")
    target = out or default_output(checkpoint, format)
    result = export_model(
        model,
        info,
        target,
        fmt=format,
        size=parse_size(size) if size else None,
        dynamic=dynamic,
        opset=opset,
        check=check,
        check_with=check_image,
    )
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
        return
    shape = "dynamic N,H,W" if result.dynamic else "static"
    print(
        f"{result.path}: {result.format}, {shape}, {result.bytes / 1e6:.1f} MB, "
        f"exported in {result.export_seconds:.1f} s"
    )
    if result.max_abs_diff is None:
        print("check: skipped", file=sys.stderr)
    else:
        print(
            f"check: max abs difference {result.max_abs_diff:.3g} (tolerance 1e-3); "
            f"labels agree on {100 * (result.label_agreement or 0):.3f}% of the check image"
        )
