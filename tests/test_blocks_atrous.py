"""AtrousConv2d: the tap-by-tap reduced-precision path computes the dilated convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcli.models.blocks import AtrousConv2d


@pytest.mark.parametrize(
    ("rate", "size"),
    [(2, (9, 11)), (5, (7, 16)), (12, (8, 8))],  # 12 > the map: outer taps read only padding
)
def test_bf16_taps_match_the_dilated_convolution(rate, size):
    # Catches a tap whose source and output windows are shifted the wrong way (a mirrored or
    # offset kernel), a tap dropped or counted twice, a missing bias, or a result left in
    # fp32 where autocast asks for bf16: each moves the output far past bf16 rounding.
    torch.manual_seed(0)
    conv = AtrousConv2d(6, 5, 3, padding=rate, dilation=rate, bias=True)
    x = torch.randn(2, 6, *size)
    rounded = {
        name: t.bfloat16().double() for name, t in (("x", x), ("w", conv.weight), ("b", conv.bias))
    }
    expected = F.conv2d(rounded["x"], rounded["w"], rounded["b"], padding=rate, dilation=rate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() < 0.02 * scale


def test_gradients_match_the_dilated_convolution():
    # Catches a training step through the tap path that loses part of the gradient (e.g. the
    # in-place accumulation cut from autograd), which DeepLab training in bf16 would rely on.
    torch.manual_seed(0)
    conv = AtrousConv2d(4, 3, 3, padding=3, dilation=3, bias=False)
    x = torch.randn(1, 4, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x).float().square().sum().backward()
    tapped = conv.weight.grad.clone()
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.conv2d(x, conv.weight, padding=3, dilation=3).float().square().sum().backward()
    assert torch.allclose(
        tapped, conv.weight.grad, rtol=0.05, atol=0.05 * tapped.abs().max().item()
    )


def test_fp32_keeps_the_dilated_kernel_exactly():
    # Catches the tap path leaking into fp32 (and so into ONNX export), where the dilated
    # kernel is as fast and the export must stay one Conv node.
    conv = AtrousConv2d(3, 2, 3, padding=4, dilation=4)
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=4, dilation=4))
