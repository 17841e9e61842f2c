"""`seg export`: a checkpoint to ONNX, TorchScript or an ExportedProgram, checked against
PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.cli._options import Json, Workers

INT8_PANEL = "INT8 (ONNX Runtime static quantization, behind an accuracy gate)"


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
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Write an INT8 ONNX file (default NAME.int8.onnx), only if its labels agree "
            "with fp32 on >= 99% of --data's pixels and its mIoU drops <= 0.5 points; "
            "otherwise exit 1 and write nothing. Needs segcli[onnx].",
            rich_help_panel=INT8_PANEL,
        ),
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Folder of images to calibrate activation ranges on [default: the training "
            "split of --data].",
            rich_help_panel=INT8_PANEL,
            show_default=False,
        ),
    ] = None,
    calib_images: Annotated[
        int,
        typer.Option(min=1, help="Calibration images, spread evenly.", rich_help_panel=INT8_PANEL),
    ] = 32,
    data: Annotated[
        str | None,
        typer.Option(
            help="Labelled dataset the gate scores on [default: the one the checkpoint was "
            "trained on].",
            rich_help_panel=INT8_PANEL,
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split the gate scores on.", rich_help_panel=INT8_PANEL)
    ] = "val",
    workers: Workers = None,
    json_output: Json = False,
) -> None:
    """Export a checkpoint's model (CPU, eval mode, fp32), or an INT8 ONNX file with --int8.

    ONNX files have input `images`, output `logits`, and the checkpoint's classes, mean/std
    and input size in their metadata (key `segcli`); INT8 files also hold the gate's figures
    (key `segcli_int8`). A check or gate that fails exits 1 and writes no file."""
    from segcli.checkpoint import load_model
    from segcli.data import parse_size
    from segcli.errors import UsageError, choose
    from segcli.export import FORMATS, default_output, export_model

    choose("--format", format, FORMATS)
    if int8:
        if format != "onnx":
            raise UsageError(f"--int8 writes ONNX; drop --format {format}")
        conflicting = {
            "--size": size is not None,
            "--check-image": check_image is not None,
            "--static": dynamic is False,
            "--no-check": check is False,
        }
        if any(conflicting.values()):
            flags = " ".join(flag for flag, given in conflicting.items() if given)
            raise UsageError(f"--int8 files are dynamic and always checked; drop {flags}")
        _export_int8(checkpoint, out, calib, calib_images, data, split, workers, opset, json_output)
        return
    if calib is not None or data is not None:
        raise UsageError("--calib and --data are for --int8; add --int8 or drop them")
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


def _export_int8(
    checkpoint: Path,
    out: Path | None,
    calib: Path | None,
    calib_images: int,
    data: str | None,
    split: str,
    workers: int | None,
    opset: int,
    json_output: bool,
) -> None:
    from segcli.quantize import export_int8

    result = export_int8(
        checkpoint,
        out,
        data=data,
        split=split,
        calib=calib,
        calib_images=calib_images,
        workers=workers,
        opset=opset,
        step=lambda text: print(f"{text} ...", file=sys.stderr),
    )
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(
        f"{result.path}: onnx int8, dynamic N,H,W, {result.bytes / 1e6:.1f} MB "
        f"(fp32 {result.fp32_bytes / 1e6:.1f} MB), {result.seconds:.0f} s"
    )
    print(f"gate: {result.gate.describe()}")
