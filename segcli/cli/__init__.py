"""The `seg` command. Each subcommand lives in its own thin module and imports torch lazily,
so `seg --help` starts without loading torch."""

from __future__ import annotations

import sys

import typer

from segcli.cli import params
from segcli.errors import SegError

app = typer.Typer(
    name="seg",
    help="Semantic segmentation for PyTorch: train, evaluate, predict, export and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("params")(params.params)


def main() -> None:
    """Console entry point: run the app and turn SegErrors into one line and an exit code."""
    try:
        app()
    except SegError as error:
        print(f"seg: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
