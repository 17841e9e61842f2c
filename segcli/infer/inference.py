"""The model-running parts of the one inference path (`segcli.infer.segmenter`): precision,
test-time flips, Gaussian sliding windows, and turning logits into labels or probabilities."""

from __future__ import annotations

import math

import torch
from torch import nn

from segcli.device import Precision, to_device


def probabilities_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities in float32: softmax over classes, sigmoid for a one-logit model."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def class_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    precision: Precision,
    device: torch.device,
    tta: bool = False,
) -> torch.Tensor:
    """N x K x H x W float32 logits (K = 1 for a binary model). With `tta`, the mean of the
    logits of the image and its horizontal and vertical flips: averaging in logit space keeps
    one rule for every averaged prediction (flips, windows, ensembles), and the activation and
    threshold come last."""
    images = to_device(images, device, precision)
    with precision.autocast(device):
        logits = model(images).float()
        if tta:
            for dims in ((3,), (2,)):
                logits += torch.flip(model(torch.flip(images, dims)).float(), dims)
            logits /= 3
    return logits


def labels_from_logits(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """N x H x W int64 class indices: the argmax of the softmax, or `sigmoid > threshold` for
    one logit, without computing either: softmax keeps the argmax, and sigmoid(x) > t exactly
    when x > log(t / (1 - t))."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > math.log(threshold / (1 - threshold))).long()
    # max().indices gives the same first-maximum index as argmax but is ~6x faster on CPU for a
    # contiguous N x K x H x W tensor (argmax over a strided dim; measured 74 vs 12 ms, 512x512).
    return logits.max(dim=1).indices


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` pixels every `stride` pixels covering `length`; the
    last window is moved back to end exactly at the border instead of hanging over it."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def gaussian_window(height: int, width: int, device: torch.device) -> torch.Tensor:
    """H x W blending weights peaking at the window centre (sigma = 1/8 of each side, as in
    nnU-Net): window borders, where the model sees the least context, count the least. The floor
    keeps every pixel's weight positive so pixels only one window covers are still defined."""
    axes = []
    for size in (height, width):
        position = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (position / (size / 8)) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]
    return weights.clamp_(min=1e-3)


def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    tile: int,
    overlap: float,
    precision: Precision,
    device: torch.device,
    tta: bool = False,
    batch_size: int = 4,
) -> torch.Tensor:
    """K x H x W float32 logits of one C x H x W image, from `tile` x `tile` windows (smaller
    sides are used whole) overlapping by the fraction `overlap`, run `batch_size` at a time and
    averaged with Gaussian weights. A window covering the whole image gives exactly the
    untiled logits. Model memory depends on the tile and batch size only; the two accumulators
    are the size of the output itself."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), not {overlap}")
    _, height, width = image.shape
    window_h, window_w = min(tile, height), min(tile, width)
    stride_h = max(1, round(window_h * (1 - overlap)))
    stride_w = max(1, round(window_w * (1 - overlap)))
    boxes = [
        (top, left)
        for top in window_starts(height, window_h, stride_h)
        for left in window_starts(width, window_w, stride_w)
    ]
    if len(boxes) == 1:
        return class_logits(model, image[None], precision=precision, device=device, tta=tta)[0]
    weights = gaussian_window(window_h, window_w, device)
    total: torch.Tensor | None = None  # K is known after the first batch
    weight_sum = torch.zeros(height, width, device=device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        windows = torch.stack(
            [image[:, top : top + window_h, left : left + window_w] for top, left in chunk]
        )
        logits = class_logits(model, windows, precision=precision, device=device, tta=tta)
        if total is None:
            total = torch.zeros(logits.shape[1], height, width, device=device)
        for (top, left), window in zip(chunk, logits, strict=True):
            total[:, top : top + window_h, left : left + window_w] += window * weights
            weight_sum[top : top + window_h, left : left + window_w] += weights
    assert total is not None  # there is always at least one window
    return total.div_(weight_sum)
