"""`seg eval MODEL...`: score a checkpoint (or an ensemble of them) on a dataset split."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from segcli.cli._options import (
    Amp,
    Device,
    Json,
    Overlap,
    Runtime,
    Threshold,
    Tile,
    Tta,
    Workers,
)

if TYPE_CHECKING:
    from segcli.infer.segmenter import Segmenter


def eval_command(
    models: Annotated[
        list[str],
        typer.Argument(
            help="A .safetensors checkpoint from seg train, a run folder (its best.safetensors) "
            "or an .onnx file. Several, or a run folder of folds (fold_0/, fold_1/, ...), are "
            "scored as one ensemble averaging their logits.",
            show_default=False,
        ),
    ],
    data: Annotated[
        str | None, typer.Option(help="Dataset folder [default: bundled mock data].")
    ] = None,
    split: Annotated[str, typer.Option(help="val | test | train.")] = "val",
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 8,
    device: Device = "auto",
    amp: Amp = "auto",
    runtime: Runtime = "auto",
    full_res: Annotated[
        bool,
        typer.Option(
            "--full-res",
            help="Score at each image's original size, on the masks seg predict would write.",
        ),
    ] = False,
    tta: Tta = False,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    threshold: Threshold = None,
    workers: Workers = None,
    compile_model: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile the model (pays back on large splits)."),
    ] = False,
    json_output: Json = False,
) -> None:
    """Score a checkpoint: per-class IoU, Dice and accuracy, with mIoU, mDice and pixel accuracy.

    The model is rebuilt from the checkpoint alone and run exactly as seg predict runs it (same
    preprocessing, --tta, --tile, --threshold); scores come from one confusion matrix over the
    whole split. `seg eval runs/cv` scores the ensemble of a cross-validation run's folds."""
    from segcli.errors import as_flags
    from segcli.infer.ensemble import describe
    from segcli.infer.evaluate import evaluate_checkpoint
    from segcli.infer.runtimes import describe_runtime

    def announce(segmenter: Segmenter) -> None:
        if len(segmenter.checkpoints) > 1:
            print(f"seg: {as_flags(describe(segmenter.checkpoints))}", file=sys.stderr, flush=True)
        if segmenter.runtime.automatic:
            print(f"seg: {describe_runtime(segmenter.runtime)}", file=sys.stderr, flush=True)

    result = evaluate_checkpoint(
        models,
        data=data,
        split=split,
        batch_size=batch_size,
        device_name=device,
        amp=amp,
        full_res=full_res,
        tta=tta,
        tile=tile,
        overlap=overlap,
        threshold=threshold,
        workers=workers,
        compile=compile_model,
        runtime=runtime,
        loaded=announce,
    )
    if json_output:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    table = Table(title=f"{result['checkpoint']} on {split} ({result['images']} images)")
    for column in ("class", "IoU", "Dice", "acc"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for index, name in enumerate(result["class_names"]):
        table.add_row(
            name,
            cell(result["iou"][index]),
            cell(result["dice"][index]),
            cell(result["acc"][index]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"mIoU {cell(result['miou'])}  mDice {cell(result['mdice'])}  "
        f"pixel acc {cell(result['pixel_acc'])}",
        soft_wrap=True,
    )
