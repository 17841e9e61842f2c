"""The UNet family: the published parameter counts, any input size, any channel count, wiring."""

import pytest
import torch

from segcli.errors import UsageError
from segcli.models import build_model
from segcli.models.summary import build_on_meta, count_parameters

SPEC_COUNTS = {
    "none": 31_036_672,
    "resnet18": 20_777_344,
    "resnet34": 30_885_504,
    "resnet50": 40_899_456,
    "resnet101": 59_891_584,
    "resnet152": 75_535_232,
}


@pytest.mark.parametrize(("backbone", "expected"), SPEC_COUNTS.items())
def test_unet_parameter_counts_match_the_published_table(backbone, expected):
    model = build_on_meta("unet", backbone, 3, 1, decoder_channels="published")
    assert count_parameters(model) == expected


def test_meta_and_real_builds_count_the_same():
    real = build_model("unet", "resnet18", classes=1, decoder_channels="published")
    assert count_parameters(real) == SPEC_COUNTS["resnet18"]


def test_plain_unet_keeps_the_published_decoder_by_default():
    assert count_parameters(build_on_meta("unet", "none", 3, 1)) == SPEC_COUNTS["none"]


@pytest.mark.parametrize(("backbone", "per_class"), [("none", 64), ("resnet34", 32)])
def test_classes_change_only_the_head(backbone, per_class):
    one = count_parameters(build_on_meta("unet", backbone, 3, 1, decoder_channels="published"))
    five = count_parameters(build_on_meta("unet", backbone, 3, 5, decoder_channels="published"))
    assert five - one == 4 * per_class


@pytest.mark.parametrize("arch", ["unet", "unetpp", "unet3p"])
@pytest.mark.parametrize("backbone", ["none", "resnet18", "vgg11_bn"])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_logits_have_the_input_size_for_odd_sizes(arch, backbone, in_channels):
    model = build_model(arch, backbone, in_channels=in_channels, classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 65, 97))
    assert out.shape == (2, 3, 65, 97)
    assert torch.isfinite(out).all()


def test_bottleneck_resnet_encoder_works_in_every_family():
    for arch in ("unet", "unetpp", "unet3p"):
        model = build_model(arch, "resnet50", in_channels=3, classes=2).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 33, 47)).shape == (1, 2, 33, 47)


@pytest.mark.parametrize(
    "options",
    [
        {"up": "bilinear"},
        {"down": "conv"},
        {"attention": "cbam"},
        {"attention": "self"},
        {"up": "bilinear", "attention": "cbam"},
    ],
)
def test_unet_options_keep_the_output_size(options):
    model = build_model("unet", "none", in_channels=3, classes=2, **options).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 2, 50, 70)


def test_strided_conv_downsampling_adds_learnt_parameters():
    pooled = count_parameters(build_on_meta("unet", "none", 3, 1))
    strided = count_parameters(build_on_meta("unet", "none", 3, 1, down="conv"))
    assert strided - pooled == 4 * sum(c * c for c in (64, 128, 256, 512))


@pytest.mark.parametrize("arch", ["unet", "unetpp", "unet3p"])
def test_gradients_reach_the_first_layer(arch):
    model = build_model(arch, "resnet18", in_channels=3, classes=2).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("arch", "options", "aux_count"),
    [
        ("unet", {"deep_supervision": True}, 2),
        ("unetpp", {"deep_supervision": True}, 3),
        ("unet3p", {"deep_supervision": True}, 4),
        ("unet3p", {"cgm": True}, 0),
    ],
)
def test_deep_supervision_returns_full_size_side_outputs_in_training(arch, options, aux_count):
    model = build_model(arch, "none", in_channels=1, classes=3, **options).train()
    out = model(torch.randn(2, 1, 40, 56))
    assert out["out"].shape == (2, 3, 40, 56)
    assert [tuple(a.shape) for a in out["aux"]] == [(2, 3, 40, 56)] * aux_count
    if options.get("cgm"):
        assert out["cls"].shape == (2, 3)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 40, 56)).shape == (1, 3, 40, 56)


@pytest.mark.parametrize("backbone", ["none", "resnet18"])
def test_unet_side_heads_leave_inference_and_the_main_path_unchanged(backbone):
    # Bug caught: side outputs taken from (or written back into) the decoder's main path, or
    # side heads that run at inference and so reach export and predict.
    torch.manual_seed(0)
    plain = build_model("unet", backbone, 3, 4).eval()
    supervised = build_model("unet", backbone, 3, 4, deep_supervision=True)
    missing, unexpected = supervised.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("side_heads.") for k in missing)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(supervised.eval()(x), plain(x))
        supervised.train()
        plain.train()
        assert torch.allclose(supervised(x)["out"], plain(x), atol=1e-6)


def test_cgm_switches_off_absent_foreground_classes_only():
    from segcli.models.unet3p import UNet3Plus

    logits = torch.tensor([0.0, 8.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    presence = torch.tensor([[-5.0, -5.0, 5.0]])
    gated = UNet3Plus._gate(logits, presence)
    assert gated[0, 0].eq(0).all()  # background is never suppressed
    assert gated[0, 2].eq(1).all()  # present classes keep their logits
    # The absent class loses the argmax it had, yet a wrong gate costs a bounded loss: the
    # old 1e4 offset made one mis-gated pixel dominate the validation loss and curves.
    assert gated.argmax(1).eq(2).all()
    wrong = torch.nn.functional.cross_entropy(gated, torch.ones(1, 2, 2, dtype=torch.long))
    assert 20 < wrong.item() < 30
    one_logit = UNet3Plus._gate(torch.full((1, 1, 2, 2), 3.0), torch.tensor([[-1.0]]))
    assert one_logit.le(-20).all()


@pytest.mark.parametrize(
    ("arch", "backbone", "options", "fragment"),
    [
        ("nope", None, {}, "unknown architecture"),
        ("unet", "resnet9", {}, "not a backbone of unet"),
        ("unet", "resnet18", {"down": "conv"}, "`down` conv"),
        ("unet", "none", {"up": "pixelshuffle"}, "`up`"),
        ("unetpp", "none", {"up": "nearest"}, "`up`"),
        ("unet", "none", {"decoder_channels": "256,128,64,32,16"}, "full-resolution"),
        ("unet", "resnet18", {"decoder_channels": "lightest"}, "`decoder_channels`"),
        ("unet", "none", {"cgm": True}, "no option cgm"),
    ],
)
def test_invalid_models_raise_usage_errors(arch, backbone, options, fragment):
    with pytest.raises(UsageError, match=fragment):
        build_model(arch, backbone, **options)


@pytest.mark.parametrize("backbone", ["none", "resnet18"])
def test_decoder_upsampling_keeps_the_deep_path_at_the_skip_scale(backbone):
    # PyTorch's default init shrank every transposed conv's output to about 0.3x the skip it is
    # concatenated with, so the deep (semantic) path entered each decoder level attenuated and
    # training learnt slowly. He init keeps the two within a factor of 2 at every level.
    torch.manual_seed(0)
    model = build_model("unet", backbone, 3, 4, decoder_channels="published").train()
    ratios = []

    def record(block, inputs, output):
        deep, skip = inputs
        ratios.append(block.up(deep, size=skip.shape[-2:]).std().item() / skip.std().item())

    hooks = [block.register_forward_hook(record) for block in model.decoder]
    model(torch.randn(2, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert len(ratios) == 4
    assert all(0.5 < ratio < 2.0 for ratio in ratios), ratios


@pytest.mark.parametrize(
    ("arch", "backbone"), [("unet", "resnet18"), ("deeplabv3", "resnet50"), ("pspnet", "resnet34")]
)
def test_residual_blocks_start_as_the_identity_from_scratch(arch, backbone, tmp_path):
    # Catches the zero-initialised residual branches lost (torchvision's default gamma of 1, or
    # a rebuild of the feature-extraction graph re-initialising them): from scratch every
    # block's residual branch must output zero, so the block passes its input through.
    # Pretrained weights (here a --backbone-weights file) must still replace that.
    from torchvision.models import resnet

    torch.manual_seed(0)
    body = build_model(arch, backbone, 3, 4).encoder.body.train()
    # The feature-extraction graph inlines each block's forward, so run its branch by hand.
    block = getattr(body.layer1, "1")
    stages = 3 if hasattr(block, "conv3") else 2  # bottleneck or basic block
    branch = torch.randn(2, block.conv1.in_channels, 16, 16)
    for stage in range(1, stages + 1):
        branch = getattr(block, f"bn{stage}")(getattr(block, f"conv{stage}")(branch))
        branch = torch.relu(branch) if stage < stages else branch
    assert branch.abs().max() == 0

    weights = tmp_path / "weights.pth"
    reference = getattr(resnet, backbone)()
    torch.save(reference.state_dict(), weights)
    loaded = build_model(arch, backbone, 3, 4, backbone_weights=str(weights)).encoder.body
    last = f"bn{stages}"
    expected = getattr(reference.layer1[1], last).weight
    torch.testing.assert_close(getattr(getattr(loaded.layer1, "1"), last).weight, expected)
    assert expected.abs().sum() > 0


def test_decoder_channels_build_the_lighter_decoder_they_name():
    # Count of a ResUNet18 with decoder widths 256,128,64,32 from SPEC.md's formulas: the
    # encoder's 11,176,512 minus fc (513,000), the transposed convs, DoubleConvs and head.
    def double_conv(c_in, c_out):
        return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out

    encoder = 11_689_512 - 513_000
    widths, skips = (256, 128, 64, 32), (256, 128, 64, 64)
    decoder, previous = 0, 512
    for width, skip in zip(widths, skips, strict=True):
        decoder += previous * width * 4 + double_conv(width + skip, width)
        previous = width
    head = 32 * 16 * 4 + 16 + 16 * 1
    light = build_on_meta("unet", "resnet18", 3, 1, decoder_channels="256,128,64,32")
    assert count_parameters(light) == encoder + decoder + head
    with pytest.raises(UsageError, match="`decoder_channels`"):
        build_model("unet", "resnet18", decoder_channels="256,128,64")


def test_fast_decoder_is_the_resnet_default_and_counts_as_its_layout_says():
    # The fast decoder by hand: nearest upsampling (no parameters), DoubleConv(previous + skip
    # -> width) at 1/16..1/2, a fifth DoubleConv at full resolution without a skip, then a 3x3
    # classifier with bias, and CBAM after every block. A default that silently stayed
    # published, a fifth block that took a skip, a lost head bias or a lost attention each
    # change the count; the published form keeps no attention.
    def double_conv(c_in, c_out):
        return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out

    encoder = 11_689_512 - 513_000
    widths, skips = (256, 128, 64, 32, 16), (256, 128, 64, 64, 0)
    decoder, previous = 0, 512
    for width, skip in zip(widths, skips, strict=True):
        decoder += double_conv(previous + skip, width)
        previous = width

    def cbam(channels):  # a shared 2-layer MLP (hidden C/16, at least 1) and a 7x7 2->1 conv
        hidden = max(channels // 16, 1)
        return 2 * channels * hidden + hidden + channels + 2 * 49

    classes = 3
    head = 9 * 16 * classes + classes
    attention = sum(cbam(width) for width in widths)
    default = build_on_meta("unet", "resnet18", 3, classes)
    assert count_parameters(default) == encoder + decoder + attention + head
    named = build_on_meta("unet", "resnet18", 3, classes, decoder_channels="fast")
    assert count_parameters(named) == count_parameters(default)
    assert default.build_config["options"]["decoder_channels"] == "256,128,64,32,16"
    assert default.build_config["options"]["up"] == "nearest"
    assert default.build_config["options"]["attention"] == "cbam"
    published = build_on_meta("unet", "resnet18", 3, classes, decoder_channels="published")
    assert published.build_config["options"]["attention"] == "none"


def test_default_cbam_starts_as_the_identity_and_its_gates_learn():
    # Catches the decoder's He initialisation overwriting CBAM's zeroed gate layers (its
    # gates then start as a random mask, 0.016 mIoU lower after the first stanford_background
    # epoch) and a gate gain other than 2 (the gates would start at half or double the input).
    torch.manual_seed(0)
    default = build_model("unet", "resnet18", 3, 3).eval()
    plain = build_model("unet", "resnet18", 3, 3, attention="none").eval()
    shared = {k: v for k, v in default.state_dict().items() if ".attention." not in k}
    plain.load_state_dict(shared)
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(default(images), plain(images))
    default.train()
    default(images).square().mean().backward()
    for block in default.decoder:  # the bias: a 16-channel block's one hidden unit can be off
        assert block.attention.spatial.weight.grad.abs().sum() > 0
        assert block.attention.mlp[2].bias.grad.abs().sum() > 0


def test_cbam_state_without_a_gate_gain_computes_the_papers_gates():
    # Catches files written before the open start (their CBAM has no `gate_gain`) loading
    # with gain 2, which doubles every gate they were trained with. The reference is the
    # paper's formula written out here.
    from segcli.models.attention import CBAM

    torch.manual_seed(0)
    trained = CBAM(32)
    for parameter in trained.parameters():
        parameter.data.normal_(0, 0.3)
    old_state = {k: v for k, v in trained.state_dict().items() if k != "gate_gain"}
    loaded = CBAM(32)
    loaded.load_state_dict(old_state)
    x = torch.randn(2, 32, 9, 11)
    mlp = trained.mlp
    channel = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    x_channel = x * channel
    pooled = torch.cat([x_channel.mean(1, keepdim=True), x_channel.amax(1, keepdim=True)], 1)
    expected = x_channel * torch.sigmoid(trained.spatial(pooled))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
        assert not torch.allclose(trained(x), expected)  # today's gates: gain 2


def test_fast_decoder_keeps_odd_sizes_and_learns_through_every_block():
    model = build_model("unet", "resnet18", 3, 2)
    out = model(torch.randn(2, 3, 45, 71))
    assert out.shape == (2, 2, 45, 71)
    out.square().mean().backward()
    # Every block's convolutions learn. CBAM's channel MLP is left out: at 16 channels its one
    # hidden unit can be off (ReLU) for a given batch, which zeroes its gradient there.
    convs = [p for name, p in model.decoder.named_parameters() if ".conv." in name]
    assert len(convs) == 2 * 3 * len(model.decoder)  # two convs: weight, BatchNorm weight, bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    spatial_gates = [block.attention.spatial.weight for block in model.decoder]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in spatial_gates)


@pytest.mark.parametrize(
    ("backbone", "encoder_channels"),
    [("none", [64, 128, 256, 512, 1024]), ("resnet34", [64, 64, 128, 256, 512])],
)
def test_unet3p_stages_take_every_scale_as_the_paper_wires_them(backbone, encoder_channels):
    # Catches a miswired full-scale decoder that still gives the right output shape (decoder
    # stages fed in reverse order, an encoder level skipped, a stage fused at the wrong scale):
    # stage X_De^L takes encoder levels 0..L at their own scales, the decoder stages below it
    # (5 x 64 = 320 channels each) at theirs, and the deepest encoder level, and gives 320
    # channels at level L's scale (Huang et al. 2020, Fig. 2).
    model = build_model("unet3p", backbone, 3, 2).eval()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        features = model.encoder(x)
    encoder = [(f.shape[1], f.shape[2], f.shape[3]) for f in features]
    assert [c for c, _, _ in encoder] == encoder_channels
    inputs, outputs = {}, {}
    for stage in model.stages:
        stage.register_forward_pre_hook(
            lambda module, args: inputs.__setitem__(
                module.level, [tuple(s.shape[1:]) for s in args[0]]
            )
        )
        stage.register_forward_hook(
            lambda module, args, out: outputs.__setitem__(module.level, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        model(x)
    deepest = len(encoder) - 1
    assert sorted(inputs) == list(range(deepest))
    for level in range(deepest):
        below = [(320, *encoder[i][1:]) for i in range(level + 1, deepest)]
        assert inputs[level] == [*encoder[: level + 1], *below, encoder[-1]], level
        assert outputs[level] == (320, *encoder[level][1:]), level
