import contextlib
import io
import os
import subprocess
import sys
import traceback

import pytest
import torch

# Two cores: one process uses both, each of two xdist workers (`pytest -n 2`) one.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# `--runtime auto` (the CLI default) exports and times a checkpoint the first time it sees it:
# seconds per new checkpoint, and the suite makes hundreds. Tests of the runtimes pass
# --runtime themselves; every other test runs the torch path it was written for.
os.environ["SEGCLI_RUNTIME"] = "torch"


def run_seg(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `seg ARGS` through the console entry point as a user would, capturing stdout and
    stderr, and return what the process would have: exit code, stdout, stderr.

    It runs in this process (sys.argv, stdin and the output streams swapped for the call):
    starting a fresh interpreter cost 2-3 s of torch import per call, most of the suite's
    time. An exception escaping the entry point is a traceback on stderr and exit 1, as it
    would be in a process. Tests of what only a real process shows (start-up imports,
    signals, pipes) start their own."""
    from segcli.cli import main

    captured = io.BytesIO()
    stdout = io.TextIOWrapper(captured, encoding="utf-8", write_through=True)
    stderr = io.StringIO()
    saved = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["seg", *args], io.StringIO(stdin or "")
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv, sys.stdin = saved
    stdout.flush()
    return subprocess.CompletedProcess(
        ["seg", *args], code, captured.getvalue().decode("utf-8"), stderr.getvalue()
    )


@pytest.fixture
def seg():
    return run_seg
