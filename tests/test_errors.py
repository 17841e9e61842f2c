"""Core messages name settings by their Python names in backticks; the CLI shows them as flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from torch import nn

import segcli
from segcli.errors import UsageError, as_flags
from segcli.train.config import TrainConfig
from segcli.train.optim import build_optimizer

PACKAGE = Path(segcli.__file__).parent
# A flag where a word starts: "--lr", "(--static)", "drop --dtype/--compile".
FLAG = re.compile(r"(^|[\s(\[/'\"])--[a-z]")


def test_as_flags_turns_setting_names_into_flags() -> None:
    """Catches: the CLI printing a core message with the library's `val_fraction` instead of the
    flag the user typed, or a translation that keeps underscores (--val_fraction) or drops the
    rest of the message."""
    message = "`val_fraction` 1.5: give a fraction in (0, 1)"
    assert as_flags(message) == "--val-fraction 1.5: give a fraction in (0, 1)"
    assert as_flags("no setting named here") == "no setting named here"


def test_core_errors_name_settings_not_flags() -> None:
    """Catches: a library caller who passed lr=-1 being told about a command-line flag (--lr)
    it never used, instead of the keyword it did pass."""
    with pytest.raises(UsageError) as caught:
        build_optimizer(nn.Linear(2, 2), "adamw", lr=-1)
    assert "`lr`" in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(UsageError) as caught:
        TrainConfig(lr=-1).validate()
    assert "`lr`" in str(caught.value) and "--" not in str(caught.value)


def test_cli_errors_name_flags(seg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the CLI passing a core message through untranslated, so that a user of
    `seg train --lr -1` reads about `lr` rather than --lr, or a bad setting found only after
    training started (exit 2 and no run folder: it fails before any work)."""
    monkeypatch.chdir(tmp_path)
    result = seg("train", "unet", "--lr", "-1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["seg: error: --lr must be positive, not -1.0"]
    assert not (tmp_path / "runs").exists()


def _message_text(node: ast.AST) -> str:
    """The literal text of a message argument: a string, or an f-string's constant parts with
    `{}` where values go; for anything else, the literal text found inside it."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
        )
    return " ".join(_message_text(child) for child in ast.iter_child_nodes(node))


def _messages(tree: ast.AST) -> list[tuple[int, str]]:
    """Every argument of a `raise X(...)` call, and the name handed to choose(...) and
    check_stride(...), which build their messages from it."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            call = node.exc
            arguments = [*call.args, *(keyword.value for keyword in call.keywords)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"choose", "check_stride"}
            and node.args
        ):
            arguments = node.args[:1]
        else:
            continue
        found += [(argument.lineno, _message_text(argument)) for argument in arguments]
    return found


def test_core_messages_do_not_name_cli_flags() -> None:
    """Catches: a new error message in the core (anything outside segcli/cli/) that names a
    command-line flag such as --batch-size; the core names the setting (`batch_size`) and the
    CLI translates. Example command lines ("Resume with: seg train ...") may keep flags."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "cli") in path.parents:
            continue
        for line, text in _messages(ast.parse(path.read_text(), filename=str(path))):
            if FLAG.search(text) and "seg " not in text:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert not offenders, "core messages naming flags:\n" + "\n".join(offenders)
