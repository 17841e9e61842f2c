"""`seg check`: validate a dataset folder and report what it holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.cli._options import DATA_PANEL, DataFormat, IgnoreValues, ReduceZeroLabel
from segcli.errors import as_flags


def check(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Dataset folder in any layout seg train reads (train/ and val/ folders, VOC, "
            "Cityscapes, ADE20K, COCO, LabelMe); default: the bundled mock data."
        ),
    ] = None,
    classes_file: Annotated[
        Path | None,
        typer.Option(
            "--classes-file",
            help="Class table (.json, .csv or names .txt); default: classes.json, classes.csv, "
            "class_names.txt or classes.txt in DATA.",
            rich_help_panel=DATA_PANEL,
        ),
    ] = None,
    foreground: Annotated[
        int | None,
        typer.Option(
            "--foreground",
            help="Binary masks: the raw mask value that is the foreground (class 1); "
            "default 255 for 0/255 masks (e.g. --foreground 0 for ISBI membranes).",
            rich_help_panel=DATA_PANEL,
        ),
    ] = None,
    data_format: DataFormat = None,
    ignore_values: IgnoreValues = None,
    reduce_zero_label: ReduceZeroLabel = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Check a dataset: pairs, readable files, mask values, sizes; report counts and classes.

    Every problem is printed as one line naming the file and what to do, and the exit code is
    2. A valid dataset gets a report: images per split, sizes and channels seen, the class
    mapping (decided once for all splits) and class pixel frequencies."""
    from segcli.data import mock_root
    from segcli.data.checks import check_dataset
    from segcli.data.classes import parse_ignore_values
    from segcli.data.dataset import DatasetError

    root = data if data is not None else mock_root()
    try:
        report = check_dataset(
            root,
            classes_file,
            foreground_value=foreground,
            required_splits=("train",),
            data_format=data_format,
            ignore_values=parse_ignore_values(ignore_values),
            reduce_zero_label=reduce_zero_label,
        )
    except DatasetError as error:
        problems = [as_flags(problem) for problem in error.problems]
        if json_output:
            print(json.dumps({"root": str(root), "valid": False, "problems": problems}))
        for problem in problems:
            print(f"seg: error: {problem}", file=sys.stderr)
        raise typer.Exit(2) from None
    if json_output:
        print(json.dumps({"valid": True, **report.to_dict()}, indent=2))
        return
    from rich.console import Console

    Console().print(report.render())
