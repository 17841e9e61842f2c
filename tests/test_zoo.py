"""The model zoo beyond UNet: counts, shapes, parity with torchvision, backbone weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision.models._api as torchvision_weights_api
from torch import nn
from torchvision import models as tvm
from torchvision.models import segmentation as tvseg

from segcli.errors import UsageError
from segcli.models import build_model
from segcli.models.fchardnet import HarDBlock, harmonic_links, harmonic_width
from segcli.models.fcn import bilinear_upsampling

SMALL = (65, 97)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def torchvision_to_segcli(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefixes = {
        "backbone.": "encoder.body.",
        "classifier.": "head.",
        "aux_classifier.": "aux_head.",
    }
    renamed = {}
    for key, value in state.items():
        prefix = next(p for p in prefixes if key.startswith(p))
        renamed[prefixes[prefix] + key.removeprefix(prefix)] = value
    return renamed


# One configuration per architecture and backbone family, kept light: fc_width shrinks FCN-VGG's
# 100M-parameter fc6, resnet18 stands for the BasicBlock ResNets, and the Bottleneck ones run
# here only where their wider layer1 matters (v3+); the parity test runs them at 65x97 too.
FAMILIES = [
    ("deeplabv3", "resnet18", {}),
    ("deeplabv3p", "resnet18", {}),
    ("deeplabv3p", "resnet50", {}),
    ("pspnet", "resnet18", {}),
    ("fcn", "vgg11", {"fc_width": 64}),
    ("fcn", "vgg13_bn", {"fc_width": 64, "stride": 16}),
    ("fcn", "vgg11", {"fc_width": 64, "stride": 32}),
    ("fcn", "resnet50", {"stride": 32}),
    ("segnet", "vgg16_bn", {}),
    ("fchardnet", "hardnet70", {}),
]


def test_segnet_count_matches_spec() -> None:
    assert count(build_model("segnet", in_channels=3, classes=3)) == 29_444_739


def test_fchardnet_count_matches_spec() -> None:
    model = build_model("fchardnet", in_channels=3, classes=19)
    assert count(model) == 4_119_257
    assert model.classify.in_channels == 48


def test_harmonic_links_and_widths() -> None:
    assert [harmonic_links(k) for k in range(1, 9)] == [
        [0],
        [1, 0],
        [2],
        [3, 2, 0],
        [4],
        [5, 4],
        [6],
        [7, 6, 4, 0],
    ]
    assert [harmonic_width(k, 10) for k in range(1, 5)] == [10, 18, 10, 28]
    assert HarDBlock(48, 10, 4).out_channels == 10 + 10 + 28


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
@pytest.mark.parametrize("aux", [False, True])
def test_counts_match_torchvision(arch: str, backbone: str, aux: bool) -> None:
    reference = getattr(tvseg, f"{arch}_{backbone}")(
        weights=None, weights_backbone=None, aux_loss=aux, num_classes=21
    )
    ours = build_model(arch, backbone, in_channels=3, classes=21, aux=aux)
    assert count(ours) == count(reference)


@pytest.mark.parametrize("arch", ["deeplabv3", "fcn"])
def test_same_weights_give_torchvision_output(arch: str) -> None:
    torch.manual_seed(0)
    reference = getattr(tvseg, f"{arch}_resnet50")(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=5
    )
    # Non-trivial BatchNorm statistics, so eval mode exercises them.
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    ours = build_model(arch, "resnet50", in_channels=3, classes=5, aux=True)
    ours.load_state_dict(torchvision_to_segcli(reference.state_dict()), strict=True)
    reference.eval()
    ours.eval()
    x = torch.randn(1, 3, *SMALL)
    with torch.no_grad():
        expected = reference(x)
        out = ours(x)
        aux = ours.aux_head(ours.encoder(x)[3])
    torch.testing.assert_close(out, expected["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        F.interpolate(aux, size=SMALL, mode="bilinear", align_corners=False),
        expected["aux"],
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(("arch", "backbone", "options"), FAMILIES)
@pytest.mark.parametrize("in_channels", [1, 4])
def test_odd_sizes_and_channels(
    arch: str, backbone: str, options: dict[str, object], in_channels: int
) -> None:
    model = build_model(arch, backbone, in_channels=in_channels, classes=3, **options).eval()
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, *SMALL))
    assert out.shape == (1, 3, *SMALL)


AUX_MODELS = [
    ("deeplabv3", "resnet18", {"aux": True}, 0.5),
    ("deeplabv3p", "resnet18", {"aux": True}, 0.5),
    ("pspnet", "resnet18", {}, 0.4),
    ("fcn", "resnet50", {"aux": True, "stride": 32}, 0.5),
]


@pytest.mark.parametrize(("arch", "backbone", "options", "weight"), AUX_MODELS)
def test_training_mode_returns_aux_outputs(
    arch: str, backbone: str, options: dict[str, object], weight: float
) -> None:
    model = build_model(arch, backbone, in_channels=3, classes=4, **options).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 33, 47))
    assert out["out"].shape == (2, 4, 33, 47)
    assert [a.shape for a in out["aux"]] == [(2, 4, 33, 47)]
    assert model.aux_weight == weight


def test_aux_is_off_by_default_for_deeplab_and_on_for_pspnet() -> None:
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert isinstance(build_model("deeplabv3", "resnet18").train()(x), torch.Tensor)
        assert isinstance(build_model("pspnet", "resnet18").train()(x), dict)


@pytest.mark.parametrize(
    ("arch", "backbone", "options"),
    [
        ("deeplabv3", "resnet18", {"aux": True}),
        ("deeplabv3p", "resnet18", {}),
        ("pspnet", "resnet18", {}),
        ("fcn", "vgg11", {"fc_width": 32}),
        ("segnet", "vgg16_bn", {}),
        ("fchardnet", "hardnet70", {}),
    ],
)
def test_gradients_reach_the_first_conv(
    arch: str, backbone: str, options: dict[str, object]
) -> None:
    model = build_model(arch, backbone, in_channels=3, classes=2, **options).train()
    out = model(torch.randn(2, 3, 32, 32))
    outputs = [out["out"], *out["aux"]] if isinstance(out, dict) else [out]
    sum(o.square().mean() for o in outputs).backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("output_stride", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_output_stride(backbone: str, output_stride: int, rates: tuple[int, ...]) -> None:
    model = build_model("deeplabv3", backbone, output_stride=output_stride).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [32, 16, 8, *(2 * [64 // output_stride])]
    aspp = model.head[0]
    assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == list(rates)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_basic_blocks_follow_torchvisions_bottleneck_rule(output_stride: int) -> None:
    # Catches a BasicBlock encoder dilated by another rule than torchvision's (which gives a
    # layer's first block the previous dilation and later blocks the new one): read the rule
    # off torchvision's own dilated ResNet-50, block by block, and ask the same of ResNet-34.
    import torchvision.models as tvm

    flags = {8: [False, True, True], 16: [False, False, True]}[output_stride]
    reference = tvm.resnet50(weights=None, replace_stride_with_dilation=flags)
    ours = build_model("deeplabv3", "resnet34", output_stride=output_stride)
    encoder = ours.encoder
    for name in ("layer2", "layer3", "layer4"):
        expected = [block.conv2.dilation[0] for block in getattr(reference, name)]
        layer = next(module for key, module in encoder.named_modules() if key.endswith(name))
        blocks = list(layer.children())
        got = [(block.conv1.dilation[0], block.conv2.dilation[0]) for block in blocks]
        # ResNet-34 has 4/6/3 blocks where ResNet-50 has 4/6/3: the same count per layer.
        assert got == [(d, d) for d in expected], name


def test_invalid_strides_and_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="`output_stride`"):
        build_model("deeplabv3", "resnet18", output_stride=32)
    with pytest.raises(UsageError, match="`stride`"):
        build_model("fcn", "vgg11", stride=4)
    with pytest.raises(UsageError, match="`aux`"):
        build_model("fcn", "vgg11", aux=True, fc_width=8)
    with pytest.raises(UsageError, match="backbone"):
        build_model("segnet", "resnet18")


def test_fcn_upsampling_starts_bilinear() -> None:
    x = torch.randn(1, 3, 6, 7)
    up = bilinear_upsampling(3, 8)
    with torch.no_grad():
        learnt = up(x)
    expected = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    assert learnt.shape == expected.shape
    # Equal away from the border, where the transposed conv sees zero padding instead of
    # interpolate's edge clamping.
    torch.testing.assert_close(learnt[..., 8:-8, 8:-8], expected[..., 8:-8, 8:-8])


def test_backbone_weights_file_resnet(tmp_path) -> None:
    torch.manual_seed(1)
    weights = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    rgb = build_model("deeplabv3", "resnet18", pretrained=True, backbone_weights=str(path))
    torch.testing.assert_close(rgb.encoder.body.conv1.weight, weights["conv1.weight"])
    torch.testing.assert_close(
        rgb.encoder.body.get_submodule("layer4.1.conv2").weight, weights["layer4.1.conv2.weight"]
    )
    gray = build_model(
        "pspnet", "resnet18", in_channels=1, pretrained=True, backbone_weights=str(path)
    )
    torch.testing.assert_close(
        gray.encoder.body.conv1.weight, weights["conv1.weight"].sum(dim=1, keepdim=True)
    )


def test_backbone_weights_file_vgg(tmp_path) -> None:
    # A whole torchvision file: the classifier weights it carries are not part of the encoder.
    weights = tvm.vgg11(weights=None).state_dict()
    path = tmp_path / "vgg11.pth"
    torch.save(weights, path)
    model = build_model(
        "fcn", "vgg11", in_channels=4, fc_width=8, pretrained=True, backbone_weights=str(path)
    )
    conv = model.encoder.body.get_submodule("features.0").weight
    rgb = weights["features.0.weight"]
    torch.testing.assert_close(conv[:, :3], rgb * 3 / 4)
    torch.testing.assert_close(conv[:, 3], rgb[:, 0] * 3 / 4)


def test_pretrained_without_network_names_backbone_weights(monkeypatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision_weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match="`backbone_weights` FILE") as caught:
        build_model("deeplabv3p", "resnet18", pretrained=True)
    assert "\n" not in str(caught.value)


def test_a_second_architecture_under_a_taken_name_is_refused() -> None:
    """Guards against the registry silently replacing an architecture with another builder."""
    from segcli.models.registry import MODELS, register_model

    before = MODELS["unet"]
    with pytest.raises(ValueError, match="registered twice"):
        register_model("unet", title="x", backbones=("resnet18",), default_backbone="resnet18")(
            lambda *args, **kwargs: nn.Identity()
        )
    assert MODELS["unet"] is before
