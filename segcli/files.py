"""Atomic file writes, shared by checkpoints, training state, exports, the precision cache and
every output `seg predict` writes: a reader never sees a half-written file, and a crash or
Ctrl-C leaves the previous file (or none) in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)` beside `path`, then rename the file onto `path` in one
    step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: some writers (torch.export.save) warn about others.
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file private (0600); give it the permissions of a normal file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def atomic_link(source: Path, path: Path) -> None:
    """Make `path` hold `source`'s content, in one rename: a hard link where the file system has
    them (no bytes written), else a copy. Only safe while `source` is replaced by renames, never
    rewritten in place (as every atomic_write does)."""

    def link_or_copy(temporary: str) -> None:
        os.unlink(temporary)  # os.link will not replace the empty file atomic_write made
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    atomic_write(path, link_or_copy)


def weights_digest(path: str | Path) -> str:
    """sha256 of a weights file: what ties a training state to its checkpoint, and an export
    to the checkpoint it was made from."""
    import hashlib

    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
