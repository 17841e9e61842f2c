"""An exponential moving average (EMA) of the weights, validated and saved in place of the raw
weights: `torch.optim.swa_utils.AveragedModel` with an EMA update and BatchNorm running
statistics averaged along with the parameters (`use_buffers=True`), so the averaged model needs
no extra pass over the data to fix its statistics.

The decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates (the rule timm's
ModelEma uses): a plain 0.999 would keep the random initialisation dominant for thousands of
steps, longer than a short run has."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def ema_weight(decay: float, updates: int) -> float:
    """The decay applied at the update after `updates` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


AverageFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor], None]


def ema_update(decay: float) -> AverageFn:
    """AveragedModel's `multi_avg_fn`: averaged <- d * averaged + (1 - d) * current. Integer
    buffers (BatchNorm's num_batches_tracked) are copied; they count, they do not average."""

    def update(
        averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], count: torch.Tensor
    ) -> None:
        weight = 1.0 - ema_weight(decay, int(count))
        floating = [(m, v) for m, v in zip(averaged, current, strict=True) if m.is_floating_point()]
        if floating:
            # One fused kernel over all tensors: a per-tensor lerp_ loop cost ~20% of a small
            # model's training step.
            means, values = zip(*floating, strict=True)
            torch._foreach_lerp_(list(means), list(values), weight)
        for mean, value in zip(averaged, current, strict=True):
            if not mean.is_floating_point():
                mean.copy_(value)

    return update


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """A copy of `model` that `update_parameters(model)` moves towards it after each step."""
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
