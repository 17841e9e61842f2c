"""Inference shared by eval, predict and training-time validation: precision, test-time
augmentation, and turning scores into class labels."""

from __future__ import annotations

import torch
from torch import nn

from segcli.engine.device import Precision, to_device


def _scores(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities in float32: softmax over classes, sigmoid for a one-logit model."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def class_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    *,
    precision: Precision,
    device: torch.device,
    tta: bool = False,
) -> torch.Tensor:
    """N x K x H x W float32 probabilities (K = 1 for a binary model). With `tta`, the mean of
    the probabilities of the image and its horizontal and vertical flips."""
    images = to_device(images, device, precision)
    with precision.autocast(device):
        probabilities = _scores(model(images))
        if tta:
            for dims in ((3,), (2,)):
                flipped = model(torch.flip(images, dims))
                probabilities += torch.flip(_scores(flipped), dims)
            probabilities /= 3
    return probabilities


def labels_from_probabilities(probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """N x H x W int64 class indices: argmax, or `probability > threshold` for one channel."""
    if probabilities.shape[1] == 1:
        return (probabilities[:, 0] > threshold).long()
    return probabilities.argmax(dim=1)
