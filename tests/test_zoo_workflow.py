"""Every zoo architecture through the whole workflow on the mock data: a short train, then
eval of its checkpoint and predict with it, as a user would chain them."""

import json

import pytest

from segcli.infer.evaluate import evaluate_checkpoint
from segcli.train.config import TrainConfig
from segcli.train.trainer import Trainer

ZOO = [
    ("deeplabv3", "resnet18", {"output_stride": 16, "aux": True}),
    ("deeplabv3p", "resnet18", {}),
    ("pspnet", "resnet18", {}),
    ("fcn", "vgg11", {"fc_width": 64, "stride": 8}),
    ("segnet", "vgg16_bn", {}),
    ("fchardnet", "hardnet70", {}),
]


@pytest.mark.parametrize(("arch", "backbone", "options"), ZOO, ids=[z[0] for z in ZOO])
def test_train_eval_predict(seg, tmp_path, arch, backbone, options):
    out = tmp_path / "run"
    config = TrainConfig(
        arch=arch,
        backbone=backbone,
        model_options=options,
        size="32",
        epochs=1,
        batch_size=8,
        workers=0,
        previews=0,
        out=str(out),
    )
    summary = Trainer(config).run()
    assert (out / "best.safetensors").is_file()

    scores = evaluate_checkpoint(str(out / "best.safetensors"), workers=0)
    assert scores["miou"] == pytest.approx(summary["val"]["miou"], abs=1e-9)

    from segcli.data import mock_root

    image = sorted((mock_root() / "val" / "images").iterdir())[0]
    # In-process through the console entry point (conftest's `seg`): the same arguments, exit
    # code and stdout as a shell, without a second torch import per architecture.
    result = seg(
        "predict",
        str(out / "best.safetensors"),
        str(image),
        "--out",
        str(tmp_path / "masks"),
        "--workers",
        "0",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    from PIL import Image

    with Image.open(image) as source, Image.open(record["output"]) as mask:
        assert mask.size == source.size
