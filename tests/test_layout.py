"""The layout the README describes holds: the core never prints, image-to-mask code (infer/)
depends on neither training nor the CLI, and nothing outside cli/ imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segcli"


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_only_the_cli_prints_or_touches_the_standard_streams():
    offenders = []
    for path in modules(PACKAGE):
        if path.is_relative_to(PACKAGE / "cli") or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.name}:{node.lineno} print")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("stdout", "stderr", "stdin")
                and getattr(node.value, "id", None) == "sys"
            ):
                offenders.append(f"{path.name}:{node.lineno} sys.{node.attr}")
    assert offenders == []


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_infer_depends_on_neither_training_nor_the_cli():
    offenders = {
        f"{path.name}: {name}"
        for path in modules(PACKAGE / "infer")
        for name in imported(path)
        if name.startswith(("segcli.train", "segcli.cli"))
    }
    assert offenders == set()


def test_the_core_does_not_import_the_cli():
    offenders = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in modules(PACKAGE)
        if not path.is_relative_to(PACKAGE / "cli") and path.name != "__main__.py"
        for name in imported(path)
        if name.startswith("segcli.cli")
    }
    assert offenders == set()
