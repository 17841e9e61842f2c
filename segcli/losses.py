"""Segmentation losses and the `--loss` spec parser.

Conventions (shared with the engine):

- A multiclass model gives logits N x C x H x W (C >= 2) and is scored with a softmax; a binary
  model gives one logit N x 1 x H x W and is scored with a sigmoid. Targets are int64 N x H x W
  holding class indices or `ignore_index`.
- Every loss drops pixels whose target is `ignore_index`, works for both model kinds and computes
  in float32 with autocast disabled, so bf16/fp16 logits and extreme logits (+-1e4) stay finite.
- A one-logit model is the two-class model with logits [0, x]: softmax([0, x]) = [1 - s(x), s(x)].
  So `ce`, `wce` and `focal` on a one-logit model are exactly binary cross-entropy, weighted BCE
  (two weights: background, foreground) and binary focal loss. `bce` is the explicit name for
  the one-logit case and is refused for multiclass models (use `ce`).
- Soft Dice, Jaccard and Tversky sum over the whole batch per class and average over classes. A
  class absent from both the target and the (argmax) prediction is left out of the mean instead
  of counting as perfect, mirroring the metrics, where such a class is NaN and left out. For a
  one-logit model only the foreground is scored: background is not one of the model's outputs.
  The per-class sums are computed without a one-hot target (memory stays one
  integer per pixel).
- `lovasz` is the Lovász-softmax for multiclass models and the Lovász hinge for one-logit models.

`build_loss("0.5*focal+dice", ...)` returns a `SegLoss` whose `describe()` (and `str()`) is the
resolved spec "0.5*focal+1*dice".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from segcli.errors import UsageError

LOSS_NAMES: tuple[str, ...] = (
    "ce",
    "wce",
    "focal",
    "ohem",
    "dice",
    "bce",
    "jaccard",
    "tversky",
    "lovasz",
)

# Denominators of ratios are clamped to this so empty classes give 0, never 0/0.
_EPS = 1e-6


class _Batch:
    """float32 views of one (logits, target) pair, computed lazily and shared by the terms of a
    joint loss so masks, probabilities and the hard prediction are computed once."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
        if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0]:
            raise ValueError(
                f"loss expects logits N x C x H x W and target N x H x W, got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        self.logits = logits.float()
        self.binary = logits.shape[1] == 1
        target = target.long()
        self.valid = target != ignore_index
        self.valid_f = self.valid.float()
        # Ignored pixels get class 0 so gathers stay in range; `valid` masks them out.
        self.target = torch.where(self.valid, target, torch.zeros_like(target))
        self.num_valid = self.valid_f.sum()

    @cached_property
    def log_probs(self) -> torch.Tensor:
        return F.log_softmax(self.logits, dim=1)

    @cached_property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    @cached_property
    def log_prob_target(self) -> torch.Tensor:
        """log p(target class) per pixel, N x H x W (garbage at ignored pixels)."""
        if self.binary:
            sign = self.target.float() * 2 - 1
            return F.logsigmoid(self.logits[:, 0] * sign)
        return self.log_probs.gather(1, self.target.unsqueeze(1)).squeeze(1)

    @cached_property
    def prediction(self) -> torch.Tensor:
        if self.binary:
            return (self.logits[:, 0] > 0).long()
        # max(...).indices is argmax with the same first-index tie rule, but several times
        # faster than argmax over the channel dimension of NCHW on CPU.
        with torch.no_grad():
            return self.logits.max(dim=1).indices

    def valid_mean(self, values: torch.Tensor) -> torch.Tensor:
        return (values * self.valid_f).sum() / self.num_valid.clamp_min(1)


class _Term(nn.Module):
    """One named loss; `compute` takes a shared `_Batch`."""

    name: str

    def compute(self, batch: _Batch) -> torch.Tensor:
        raise NotImplementedError


class _CrossEntropy(_Term):
    """ce / wce / bce. With weights, the mean is weighted like `F.cross_entropy(weight=...)`."""

    def __init__(self, name: str, weights: Sequence[float] | None) -> None:
        super().__init__()
        self.name = name
        self.weights: torch.Tensor | None
        self.register_buffer(
            "weights",
            None if weights is None else torch.tensor(list(weights), dtype=torch.float32),
        )

    def compute(self, batch: _Batch) -> torch.Tensor:
        nll = -batch.log_prob_target
        if self.weights is None:
            return batch.valid_mean(nll)
        pixel_weights = self.weights.to(nll.device)[batch.target] * batch.valid_f
        return (nll * pixel_weights).sum() / pixel_weights.sum().clamp_min(_EPS)


class _Focal(_Term):
    """Focal loss, mean over valid pixels. alpha weights foreground (class >= 1) pixels by alpha
    and background (class 0) pixels by 1 - alpha, as in RetinaNet's binary form."""

    name = "focal"

    def __init__(self, gamma: float, alpha: float | None) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def compute(self, batch: _Batch) -> torch.Tensor:
        log_pt = batch.log_prob_target
        loss = -log_pt
        if self.gamma:
            # expm1 keeps 1 - p accurate near p = 1; the clamp keeps pow's gradient finite at 0
            # for gamma < 1.
            one_minus_pt = (-torch.expm1(log_pt)).clamp_min(1e-12)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.alpha is not None:
            loss = torch.where(batch.target > 0, self.alpha, 1 - self.alpha) * loss
        return batch.valid_mean(loss)


class _HardPixelCrossEntropy(_Term):
    """Online hard example mining: cross-entropy averaged over the valid pixels whose target
    probability is below `threshold`, or over the hardest `min_fraction` of them when fewer are
    that hard (the OhemCrossEntropy of HRNet and mmsegmentation, with the minimum given as a
    fraction so it does not depend on the crop size). Easy pixels stop diluting the mean, so
    small and rare classes keep their share of the gradient late in training."""

    name = "ohem"

    def __init__(self, threshold: float = 0.7, min_fraction: float = 1 / 16) -> None:
        super().__init__()
        self.log_threshold = math.log(threshold)
        self.min_fraction = min_fraction

    def compute(self, batch: _Batch) -> torch.Tensor:
        nll = -batch.log_prob_target
        valid_count = int(batch.num_valid.item())
        if valid_count == 0:
            return batch.valid_mean(nll)
        hard = batch.valid & (nll > -self.log_threshold)
        min_kept = max(1, math.ceil(valid_count * self.min_fraction))
        if int(hard.sum().item()) < min_kept:
            # The min_kept-th largest loss among valid pixels becomes the cut.
            cut = nll.detach()[batch.valid].topk(min_kept).values[-1]
            hard = batch.valid & (nll.detach() >= cut)
        return nll[hard].mean()


def _region_sums(
    batch: _Batch, include_background: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored class: soft intersection, soft prediction mass, target pixel count, and whether
    the class is present in the target or the hard prediction."""
    valid_f = batch.valid_f
    if batch.binary:
        fg_prob = torch.sigmoid(batch.logits[:, 0]) * valid_f
        fg_target = (batch.target == 1).float() * valid_f
        intersection = (fg_prob * fg_target).sum().reshape(1)
        prob_mass = fg_prob.sum().reshape(1)
        target_count = fg_target.sum().reshape(1)
        predicted = (batch.prediction.float() * valid_f).sum().reshape(1) > 0
        return intersection, prob_mass, target_count, (target_count > 0) | predicted
    classes = batch.logits.shape[1]
    flat_target = batch.target.flatten()
    flat_valid = valid_f.flatten()
    # Intersection of class c = sum of p_c over pixels labelled c: the probability gathered at
    # the target class, summed per class. No N x C x H x W one-hot is built. index_add is used
    # for every per-class sum because it is much faster than bincount on CPU.
    p_target = batch.probs.gather(1, batch.target.unsqueeze(1)).flatten() * flat_valid
    zeros = flat_valid.new_zeros(classes)
    intersection = zeros.index_add(0, flat_target, p_target)
    # A batched matmul with the mask: the masked N x C x H x W product is never stored.
    n = batch.probs.shape[0]
    probs = batch.probs.reshape(n, classes, -1)
    prob_mass = torch.bmm(probs, valid_f.reshape(n, -1, 1)).sum((0, 2))
    target_count = zeros.index_add(0, flat_target, flat_valid)
    predicted = zeros.index_add(0, batch.prediction.flatten(), flat_valid) > 0
    present = (target_count > 0) | predicted
    if not include_background:
        present[0] = False
    return intersection, prob_mass, target_count, present


class _Region(_Term):
    """Soft Dice, Jaccard (IoU) or Tversky: 1 - mean over present classes of the soft score."""

    def __init__(self, name: str, include_background: bool, alpha: float, beta: float) -> None:
        super().__init__()
        self.name = name
        self.include_background = include_background
        self.alpha = alpha
        self.beta = beta

    def compute(self, batch: _Batch) -> torch.Tensor:
        inter, mass, count, present = _region_sums(batch, self.include_background)
        if self.name == "dice":
            score = 2 * inter / (mass + count).clamp_min(_EPS)
        elif self.name == "jaccard":
            score = inter / (mass + count - inter).clamp_min(_EPS)
        else:
            false_pos = mass - inter
            false_neg = count - inter
            denominator = inter + self.alpha * false_pos + self.beta * false_neg
            score = inter / denominator.clamp_min(_EPS)
        present_f = present.float()
        return ((1 - score) * present_f).sum() / present_f.sum().clamp_min(1)


def _lovasz_grad(sorted_target: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al.
    2018, algorithm 1)."""
    total = sorted_target.sum()
    intersection = total - sorted_target.cumsum(0)
    union = total + (1 - sorted_target).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class _Lovasz(_Term):
    """Lovász-softmax over classes present in target or prediction (multiclass); Lovász hinge
    on the logit (one-logit binary). Both over all valid pixels of the batch."""

    name = "lovasz"

    def compute(self, batch: _Batch) -> torch.Tensor:
        valid = batch.valid.flatten()
        target = batch.target.flatten()[valid]
        zero = batch.logits.sum() * 0
        if target.numel() == 0:
            return zero
        if batch.binary:
            logits = batch.logits[:, 0].flatten()[valid]
            errors = 1 - logits * (target.float() * 2 - 1)
            errors, order = errors.sort(descending=True)
            return torch.dot(F.relu(errors), _lovasz_grad(target[order].float()))
        classes = batch.logits.shape[1]
        probs = batch.probs.permute(0, 2, 3, 1).reshape(-1, classes)[valid]
        prediction = batch.prediction.flatten()[valid]
        losses = []
        for c in range(classes):
            foreground = (target == c).float()
            if not bool(foreground.any()) and not bool((prediction == c).any()):
                continue
            errors, order = (foreground - probs[:, c]).abs().sort(descending=True)
            losses.append(torch.dot(errors, _lovasz_grad(foreground[order])))
        return torch.stack(losses).mean() if losses else zero


class SegLoss(nn.Module):
    """A weighted sum of named losses. `describe()` / `str()` give the resolved spec."""

    def __init__(self, terms: Sequence[tuple[float, _Term]], ignore_index: int) -> None:
        super().__init__()
        self.weights = [weight for weight, _ in terms]
        self.terms = nn.ModuleList([term for _, term in terms])
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The losses need float32 reductions and exp/log; autocast would run bmm in bf16.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            batch = _Batch(logits, target, self.ignore_index)
            total = self.weights[0] * self.terms[0].compute(batch)
            for weight, term in zip(self.weights[1:], self.terms[1:], strict=True):
                total = total + weight * term.compute(batch)
        return total

    def describe(self) -> str:
        return "+".join(f"{w:g}*{t.name}" for w, t in zip(self.weights, self.terms, strict=True))

    def __str__(self) -> str:
        return self.describe()


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """'0.5*focal+dice' -> [(0.5, 'focal'), (1.0, 'dice')]; UsageError on anything else."""
    valid = ", ".join(LOSS_NAMES)
    parts = [part.strip() for part in spec.lower().split("+")]
    if not spec.strip() or any(not part for part in parts):
        raise UsageError(
            f"`loss`: malformed spec '{spec}'; use e.g. 0.5*focal+dice; valid: {valid}"
        )
    terms: list[tuple[float, str]] = []
    for part in parts:
        weight_text, _, name = part.rpartition("*")
        name = name.strip()
        if name not in LOSS_NAMES:
            raise UsageError(f"`loss`: unknown loss '{name}'; valid: {valid}")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(
                f"`loss`: bad weight '{weight_text.strip()}' in '{part}'; "
                "weights are positive numbers, e.g. 0.5*focal+dice"
            )
        if name in (n for _, n in terms):
            raise UsageError(f"`loss`: '{name}' appears twice in '{spec}'")
        terms.append((weight, name))
    return terms


def build_loss(
    spec: str,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float = 2.0,
    focal_alpha: float | None = None,
    tversky_alpha: float = 0.5,
    tversky_beta: float = 0.5,
    dice_include_background: bool = True,
) -> SegLoss:
    """Build the loss for `--loss spec`. `num_classes` is the model's output channels (1 = binary
    one-logit). `class_weights` (used by `wce` only) has one weight per class, two (background,
    foreground) for a one-logit model. `bce` needs a one-logit model; `ce`/`wce`/`focal` on a
    one-logit model are their binary (sigmoid) forms."""
    if num_classes < 1:
        raise UsageError(
            f"`loss`: the model must have at least 1 output channel, got {num_classes}"
        )
    if focal_gamma < 0:
        raise UsageError(f"`focal_gamma` must be >= 0, got {focal_gamma}")
    if focal_alpha is not None and not 0 <= focal_alpha <= 1:
        raise UsageError(f"`focal_alpha` must be in [0, 1], got {focal_alpha}")
    if tversky_alpha < 0 or tversky_beta < 0 or tversky_alpha + tversky_beta == 0:
        raise UsageError("`tversky_alpha`/`tversky_beta` must be >= 0 and not both 0")
    scored = max(num_classes, 2)
    terms: list[tuple[float, _Term]] = []
    for weight, name in parse_loss_spec(spec):
        term: _Term
        if name == "ce":
            term = _CrossEntropy("ce", None)
        elif name == "bce":
            if num_classes != 1:
                raise UsageError(
                    f"`loss` bce needs a one-logit binary model (`classes` 1), this model has "
                    f"{num_classes} outputs; use ce"
                )
            term = _CrossEntropy("bce", None)
        elif name == "wce":
            if class_weights is None:
                raise UsageError("`loss` wce needs `class_weights` (e.g. 1,2,5 or auto)")
            if len(class_weights) != scored or any(
                not math.isfinite(w) or w < 0 for w in class_weights
            ):
                raise UsageError(
                    f"`class_weights` needs {scored} non-negative numbers (one per scored class), "
                    f"got {list(class_weights)}"
                )
            term = _CrossEntropy("wce", class_weights)
        elif name == "focal":
            term = _Focal(focal_gamma, focal_alpha)
        elif name == "ohem":
            term = _HardPixelCrossEntropy()
        elif name in ("dice", "jaccard", "tversky"):
            term = _Region(name, dice_include_background, tversky_alpha, tversky_beta)
        else:
            term = _Lovasz()
        terms.append((weight, term))
    return SegLoss(terms, ignore_index)


def median_frequency_weights(pixel_counts: Sequence[int | float]) -> list[float]:
    """Median-frequency class weights (Eigen & Fergus 2015): median(freq) / freq_c, with freq_c =
    pixels of class c / labelled pixels. Classes with no pixels get weight 0 and do not enter the
    median (they cannot be learned from this training set)."""
    total = float(sum(pixel_counts))
    if total <= 0:
        raise UsageError("`class_weights` auto: the training masks contain no labelled pixels")
    frequencies = [count / total for count in pixel_counts]
    median = statistics.median(f for f in frequencies if f > 0)
    return [median / f if f > 0 else 0.0 for f in frequencies]
