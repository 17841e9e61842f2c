"""The inference spec: stored in every checkpoint, read back the same, legacy files get the
defaults they were trained with, and a newer spec is refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from segcli.checkpoint import METADATA_KEY, CheckpointInfo, read_checkpoint
from segcli.errors import UsageError
from segcli.infer.spec import InferenceSpec

MODEL = {"arch": "unet", "backbone": "none", "in_channels": 1, "classes": 1, "options": {}}


def info(**changes) -> CheckpointInfo:
    return CheckpointInfo(MODEL, {"names": ["fg"]}, (48, 64), (0.4,), (0.3,), **changes)


def write(path, metadata: dict) -> None:
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: json.dumps(metadata)})


def test_every_checkpoint_stores_its_spec_and_reads_it_back(tmp_path):
    stored = json.loads(info().to_json())["inference"]
    # Independent of the code under test: what a one-logit, gray, 48x64 model was fed.
    assert stored == {
        "version": 1,
        "policy": "resize",
        "size": [48, 64],
        "scale": 1.0,
        "in_channels": 1,
        "mean": [0.4],
        "std": [0.3],
        "activation": "sigmoid",
        "threshold": 0.5,
    }
    path = tmp_path / "m.safetensors"
    write(path, json.loads(info().to_json()))
    _, read = read_checkpoint(path)
    assert read.spec == InferenceSpec.from_dict(stored)
    # Blocks written before `scale` existed (resize policy only) read as scale 1.
    without_scale = {k: v for k, v in stored.items() if k != "scale"}
    assert InferenceSpec.from_dict(without_scale) == read.spec


def test_a_checkpoint_without_the_block_gets_the_legacy_defaults(tmp_path):
    # A frozen copy of the metadata segcli wrote before the block existed.
    legacy = json.loads(info().to_json())
    del legacy["inference"]
    legacy["model"] = {**MODEL, "classes": 3}
    path = tmp_path / "old.safetensors"
    write(path, legacy)
    _, read = read_checkpoint(path)
    assert read.spec.policy == "resize" and read.spec.size == (48, 64)
    assert read.spec.activation == "softmax" and read.spec.mean == (0.4,)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"version": 2}, "newer segcli"), ({"policy": "mosaic"}, "unreadable segcli metadata")],
)
def test_a_spec_this_segcli_cannot_follow_is_refused_by_name(tmp_path, seg, change, fragment):
    metadata = json.loads(info().to_json())
    metadata["inference"].update(change)
    path = tmp_path / "future.safetensors"
    write(path, metadata)
    with pytest.raises(UsageError, match=fragment):
        read_checkpoint(path)
    result = seg("eval", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and fragment in lines[0]


def test_tta_is_the_mean_of_the_image_and_its_two_flips():
    # Catches flips not undone before averaging, a sum instead of a mean, or --tta ignored:
    # a conv with a random 3x3 kernel is not flip-symmetric, so every one would show.
    from torch import nn

    from segcli.device import Precision
    from segcli.infer.inference import class_logits

    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1).eval()
    images = torch.randn(2, 3, 8, 10)
    with torch.no_grad():
        expected = (
            model(images) + model(images.flip(3)).flip(3) + model(images.flip(2)).flip(2)
        ) / 3
        cpu, plain = torch.device("cpu"), Precision(None, channels_last=False)
        got = class_logits(model, images, precision=plain, device=cpu, tta=True)
        without = class_logits(model, images, precision=plain, device=cpu, tta=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(without, expected, atol=1e-3)
