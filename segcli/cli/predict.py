"""`seg predict MODEL... INPUT... --out DIR`: segment images for shell pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segcli.cli._options import (
    RUN_PANEL,
    Amp,
    Device,
    Overlap,
    Runtime,
    Threshold,
    Tile,
    Tta,
    Workers,
)

OUTPUT_PANEL = "Output"


def predict(
    models: Annotated[
        str,
        typer.Argument(
            help="A .safetensors checkpoint, a run folder (its best.safetensors) or an .onnx file "
            "from seg export. Several, or a run folder of folds (fold_0/, fold_1/, ...), average "
            "their logits as one ensemble.",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) or - for paths on stdin; the "
            "arguments after the models.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (`DIR/<stem>.png`), or - for one image's bytes on stdout.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ],
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="index (class indices, mode L) | color (palette PNG) | overlay (image with "
            "class colours) | prob (float16 .npy, K x H x W).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = "index",
    threshold: Threshold = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON line per output: input, output, size, pixels per class.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace existing outputs (default: skip them).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    size: Annotated[
        str | None,
        typer.Option(
            help="Model input size N or HxW, or 'native' for each image's own size (equal sizes "
            "are batched together). Default: the checkpoint's input size.",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    tta: Tta = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Images (or windows) per forward.", rich_help_panel=RUN_PANEL
        ),
    ] = 4,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    runtime: Runtime = "auto",
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the model: a one-off compile (about 20 s for DeepLabv3-ResNet50 "
            "on 2 CPU cores) for 1.05-1.2x faster batches; pays back over hundreds of images.",
            rich_help_panel=RUN_PANEL,
        ),
    ] = False,
    fail_fast: Annotated[
        bool,
        typer.Option("--fail-fast", help="Stop at the first bad input.", rich_help_panel=RUN_PANEL),
    ] = False,
) -> None:
    """Segment images; write one output per image at its original size.

    stdout carries only the written paths, one per line as each is written (or JSON lines with
    --json), so `find imgs -name '*.png' | seg predict model.safetensors - --out masks/ | xargs
    ...` works. Unreadable inputs are reported on stderr and skipped (exit 1 at the end); a bad
    checkpoint exits 2. The leading arguments that are checkpoints or run folders are the
    models: `seg predict runs/cv imgs/ --out m/` ensembles every fold of a cross-validation
    run."""
    from segcli.cli.output import predict as run_predict
    from segcli.infer.ensemble import split_models
    from segcli.infer.predict import PredictOptions

    options = PredictOptions(
        out=None if out == "-" else Path(out),
        format=output_format,
        size=size,
        threshold=threshold,
        tile=tile,
        overlap=overlap,
        tta=tta,
        batch_size=batch_size,
        workers=workers,
        device=device,
        amp=amp,
        runtime=runtime,
        compile=compile_model,
        overwrite=overwrite,
        fail_fast=fail_fast,
        json=json_output,
    )
    # Typer fills `models` with the first positional only; the models that follow it are at
    # the head of `inputs`.
    checkpoints, images = split_models([models, *inputs])
    run_predict(checkpoints, images, options)
