"""The `seg` console script and `python -m segcli`. Outside `segcli.cli`, whose import needs
Typer, so that a Python where segcli was installed without its dependencies (`pip install
--no-deps`, or the package copied into another environment) gets one line saying what is
missing instead of a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from segcli.cli import main as run

        run()
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if not package or package == "segcli":
            raise  # a module of segcli's own missing is a broken install or a bug: show it
        print(
            f"seg: error: the Python package {package} is not installed in {sys.executable}; "
            "install segcli with its dependencies in this Python (`pip install .` from its "
            "folder, with an extra such as `.[onnx]` for an optional one), or run the seg of "
            "the environment segcli was installed in",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
