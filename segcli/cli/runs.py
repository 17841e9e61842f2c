"""`seg runs [DIR]` and `seg runs compare A B [C...]`: the run folders of past trainings as one
table, or side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.cli._options import Json


def runs(
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            help="DIR (default runs/), or: compare RUN_A RUN_B [RUN_C...].",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path,
        typer.Option(help="compare: the PNG of the runs' val loss and mIoU curves overlaid."),
    ] = Path("runs-compare.png"),
    json_output: Json = False,
) -> None:
    """List run folders (arch, backbone, data, epochs, best val mIoU, wall-clock, status),
    best first; or compare runs: the settings that differ, best metrics side by side and one
    PNG of their curves.

    A metrics.jsonl line that is not a record is reported on stderr and skipped, and the exit
    code is then 2."""
    from segcli.errors import UsageError, as_flags
    from segcli.train.runs import list_runs, read_run

    arguments = arguments or []
    if arguments[:1] == ["compare"]:
        paths = [Path(argument) for argument in arguments[1:]]
        if len(paths) < 2:
            raise UsageError("seg runs compare: give at least two run folders")
        missing = [path for path in paths if not path.is_dir()]
        if missing:
            raise UsageError(f"{missing[0]}: no such run folder")
        records = [read_run(path) for path in paths]
        _compare(records, plot, json_output)
    else:
        if len(arguments) > 1:
            raise UsageError(
                f"seg runs takes one folder, got {len(arguments)}; did you mean seg runs compare?"
            )
        root = Path(arguments[0] if arguments else "runs")
        records = list_runs(root)
        _table(records, root, json_output)
    problems = [problem for record in records for problem in record.problems]
    for problem in problems:
        print(f"seg: error: {as_flags(problem)}", file=sys.stderr)
    if problems:
        raise typer.Exit(2)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _under(path: Path, root: Path) -> str:
    """A run's folder as shown: relative to the folder listed ("." for that folder itself)."""
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _table(records: list, root: Path, json_output: bool) -> None:
    rows = [record.to_dict() for record in records]
    if json_output:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs under {root}, best val mIoU first (at: its epoch)")
    names = [_under(Path(row["run"]), root) for row in rows]
    numbers = ("epochs", "mIoU", "at", "wall")
    for column in ("run", "model", "data", *numbers, "status"):
        # Names wrap when the terminal is narrow; numbers and the status are never cut.
        table.add_column(
            column,
            justify="right" if column in numbers else "left",
            overflow="fold",
            no_wrap=column in (*numbers, "status"),
            min_width=min(max(map(len, names)), 12) if column == "run" else None,
        )
    for name, row in zip(names, rows, strict=True):
        table.add_row(
            name,
            f"{row['arch']}/{row['backbone']}",
            Path(str(row["data"])).name,
            f"{row['epochs_done']}/{row['epochs_planned']}",
            _fmt(row["best_miou"]),
            str(row["best_epoch"] or "-"),
            _minutes(row["wall_seconds"]),
            row["status"],
        )
    # Piped output has no terminal width: give the table room instead of rich's 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def _compare(records: list, plot: Path, json_output: bool) -> None:
    from segcli.train.runs import config_differences, plot_comparison

    labels = [record.path.name[:14] for record in records]
    if len(set(labels)) < len(labels):
        labels = [f"{chr(65 + i)} {label}"[:14] for i, label in enumerate(labels)]
    differences = config_differences(records)
    plot_comparison(records, labels, plot)
    rows = [record.to_dict() for record in records]
    if json_output:
        print(json.dumps({"runs": rows, "differences": differences, "plot": str(plot)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    settings = Table(title="settings that differ")
    settings.add_column("setting")
    for label in labels:
        settings.add_column(label)
    for key, values in differences.items():
        settings.add_row(key, *(json.dumps(value) for value in values))
    scores = Table(title="best val metrics")
    scores.add_column("")
    for label in labels:
        scores.add_column(label, justify="right")

    def metric(name: str) -> list[str]:
        return [_fmt((row["best_val"] or {}).get(name)) for row in rows]

    scores.add_row("mIoU", *metric("miou"))
    scores.add_row("mDice", *metric("mdice"))
    scores.add_row("pixel acc", *metric("pixel_acc"))
    scores.add_row("best epoch", *(str(row["best_epoch"] or "-") for row in rows))
    scores.add_row("epochs", *(f"{row['epochs_done']}/{row['epochs_planned']}" for row in rows))
    scores.add_row("wall", *(_minutes(row["wall_seconds"]) for row in rows))
    scores.add_row("status", *(row["status"] for row in rows))
    for label, record in zip(labels, records, strict=True):
        console.print(f"{label}: {record.path}", soft_wrap=True)
    console.print(settings if differences else "settings: identical")
    console.print(scores)
    console.print(f"curves: {plot}", soft_wrap=True)
