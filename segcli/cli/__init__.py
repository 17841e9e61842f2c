"""The `seg` command. Each subcommand lives in its own thin module and imports torch lazily,
so `seg --help` starts without loading torch."""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from segcli import __version__
from segcli.cli import bench, check, export, params, predict, runs, serve, train
from segcli.cli import eval as eval_cli
from segcli.errors import ReaderGone, SegError, as_flags

app = typer.Typer(
    name="seg",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train.train)
app.command("eval")(eval_cli.eval_command)
app.command("params")(params.params)
app.command("predict")(predict.predict)
app.command("check")(check.check)
app.command("export")(export.export)
app.command("bench")(bench.bench)
app.command("serve")(serve.serve)
app.command("runs")(runs.runs)


def _version(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def seg(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Semantic segmentation for PyTorch: train, evaluate, predict, export and benchmark.

    Data goes to stdout, progress and logs to stderr; exit 0 on success, 1 when the work
    failed, 2 for a usage or input error."""


def main() -> None:
    """Console entry point: usage and input errors become one line on stderr and exit 2."""
    try:
        code = app(standalone_mode=False)
    except ReaderGone as error:
        sys.exit(error.exit_code)
    except SegError as error:
        print(f"seg: error: {as_flags(str(error))}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print("seg: interrupted", file=sys.stderr)
        sys.exit(130)
    except TyperException as error:
        message = error.format_message()
        if message:  # empty when `seg` alone printed its help page
            commands = {command.name for command in app.registered_commands}
            command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in commands else ""
            hint = f"seg {command} --help" if command else "seg --help"
            print(f"seg: error: {message} (see '{hint}')", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
