"""Errors the CLI turns into one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import re

# The core names a setting as its Python name in backticks (`val_fraction`), the keyword a
# library caller passed; the CLI shows the same message with the flag (--val-fraction).
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


class SegError(Exception):
    """A failure the user can act on. `exit_code`: 1 for a failure at run time, 2 for bad
    input (a usage error), as every `seg` command exits."""

    exit_code = 1


class UsageError(SegError, ValueError):
    """Bad flag, unknown name, missing file or invalid dataset: exit 2."""

    exit_code = 2


class RuntimeFailure(SegError):
    """The inputs were valid but the work failed (non-finite loss, export mismatch): exit 1."""

    exit_code = 1


class ReaderGone(SegError):
    """stdout's reader went away (`seg predict ... | head -3`): the CLI stops without a message,
    as Unix filters do, with the status a SIGPIPE gives them (128 + 13)."""

    exit_code = 141


def choose(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    """Return `value` if it is one of `valid`, else raise a UsageError listing the valid names."""
    if value in valid:
        return value
    raise UsageError(f"unknown {kind} '{value}'; valid: {', '.join(valid)}")


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type name when it has none: how a library
    error is quoted inside one of segcli's one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def as_flags(message: str) -> str:
    """A core message in the command line's words: each setting it names in backticks, such as
    `val_fraction`, becomes its flag, --val-fraction."""
    return _SETTING.sub(lambda match: "--" + match.group(1).replace("_", "-"), message)
