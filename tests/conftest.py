import subprocess
import sys

import pytest
import torch

torch.set_num_threads(2)


def run_seg(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m segcli ARGS` as a user would, capturing stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "segcli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def seg():
    return run_seg
