"""Fixed-seed output fingerprints of every architecture: a change of wiring (a skip joined to
another stage, decoder stages in another order, a dropped block) that keeps every shape and
parameter count changes the numbers, and these tests say which model moved.

The reference values are this code's own outputs, recorded when the wiring was last checked
against the papers' tables and torchvision (tests/test_zoo.py, tests/test_models_unet_family.py).
A deliberate change of a model regenerates them with `python -m tests.test_fingerprints` and
says why in its commit. They depend on torch's initialisation, so a torch release that changes
it regenerates them too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from segcli.models import build_model

MODELS = [
    ("unet", "none"),
    ("unet", "resnet18"),
    ("unetpp", "resnet18"),
    ("unet3p", "resnet18"),
    ("deeplabv3", "resnet18"),
    ("deeplabv3p", "resnet18"),
    ("pspnet", "resnet18"),
    ("fcn", "resnet50"),
    ("segnet", "vgg16_bn"),
    ("fchardnet", "hardnet70"),
]
RECORD = Path(__file__).with_name("fingerprints.json")


def fingerprint(arch: str, backbone: str) -> dict[str, object]:
    """Shape, sum, absolute sum and four sampled logits of a seeded model on a seeded batch."""
    torch.manual_seed(0)
    model = build_model(arch, backbone, 3, 5).eval()
    images = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images).double()
    flat = logits.flatten()
    samples = [flat[i].item() for i in (0, flat.numel() // 3, flat.numel() // 2, -1)]
    return {
        "shape": list(logits.shape),
        "sum": logits.sum().item(),
        "abs_sum": logits.abs().sum().item(),
        "samples": samples,
    }


@pytest.mark.parametrize(("arch", "backbone"), MODELS)
def test_output_fingerprint_is_unchanged(arch: str, backbone: str) -> None:
    expected = json.loads(RECORD.read_text())[f"{arch}/{backbone}"]
    seen = fingerprint(arch, backbone)
    assert seen["shape"] == expected["shape"]
    # fp32 kernels differ between CPU kinds in the last bits; wiring changes move these by
    # orders of magnitude more.
    assert seen["abs_sum"] == pytest.approx(expected["abs_sum"], rel=1e-4)
    assert seen["sum"] == pytest.approx(expected["sum"], abs=1e-5 * expected["abs_sum"])
    typical = expected["abs_sum"] / torch.Size(expected["shape"]).numel()
    assert seen["samples"] == pytest.approx(expected["samples"], abs=1e-3 * typical)


if __name__ == "__main__":
    records = {f"{arch}/{backbone}": fingerprint(arch, backbone) for arch, backbone in MODELS}
    RECORD.write_text(json.dumps(records, indent=2) + "\n")
    sys.stdout.write(f"wrote {len(records)} fingerprints to {RECORD}\n")
