"""The README's Python API example runs as written, and the API returns what it promises.

Bugs this catches: the README drifting from the API (a renamed method or keyword), `predict`
returning masks at the model size instead of the image's, `predict_batch` mixing up the order
of its inputs, `from segcli import Segmenter` failing or importing torch at `seg --help` time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import write_mock_checkpoint

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    write_mock_checkpoint(tmp_path / "runs" / "unet-resnet18" / "best.safetensors")
    (tmp_path / "data").symlink_to(REPO / "data")
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    first, second, third = done.stdout.strip().splitlines()
    assert first == "['background', 'circle', 'rectangle']"
    height, width = Image.open(REPO / "data/mock/val/images/val_000.jpg").size[::-1]
    assert second == f"({height}, {width}) uint8"
    assert third.startswith("2 (3, ")


def test_predict_batch_keeps_order_and_original_sizes(tmp_path: Path) -> None:
    from segcli import Segmenter

    checkpoint = tmp_path / "runs" / "m" / "best.safetensors"
    write_mock_checkpoint(checkpoint)
    segmenter = Segmenter.load(checkpoint, device="cpu", amp="off")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in ((50, 70, 3), (90, 40, 3))]
    masks = segmenter.predict_batch(images)
    assert [m.shape for m in masks] == [(50, 70), (90, 40)]
    for image, mask in zip(images, masks, strict=True):
        assert np.array_equal(segmenter.predict(Image.fromarray(image)), mask)
    probabilities = segmenter.probabilities(images[0])
    assert probabilities.shape == (3, 50, 70)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(probabilities.argmax(axis=0), masks[0])
