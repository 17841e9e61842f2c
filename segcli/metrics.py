"""The confusion-matrix metric every `seg` score comes from.

One int64 matrix (rows = target, columns = prediction) accumulated on the device over the whole
evaluated set; scores are derived from it only at `compute()`, never averaged over batches.
Per-class rules: IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), accuracy = recall = TP/(TP+FN),
precision = TP/(TP+FP); a zero denominator gives NaN, and mIoU/mDice are NaN-ignoring means.
`compute()` returns floats with NaN; `to_json()` returns the same with NaN replaced by None.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

MetricValue = float | list[float]


class ConfusionMatrix:
    """Confusion matrix over `num_classes` scored classes (2 for a one-logit binary model)."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"ConfusionMatrix needs at least 2 scored classes, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits N x C x H x W (argmax), N x 1 x H x W (logit > 0, i.e. sigmoid >
        0.5) or integer predictions N x H x W; target N x H x W with `ignore_index` dropped."""
        preds = self._predictions(logits_or_preds)
        if preds.shape != target.shape:
            raise ValueError(
                f"predictions {tuple(preds.shape)} and target {tuple(target.shape)} differ"
            )
        k = self.num_classes
        target = target.to(self.matrix.device, torch.int64)  # uint8 masks would overflow t * k
        preds = preds.to(self.matrix.device)
        valid = target != self.ignore_index
        out_of_range = valid & ((target < 0) | (target >= k))
        # Ignored pixels go to bin k*k and out-of-range targets to bin k*k+1, so the update needs
        # no boolean indexing; the only host sync is the range check.
        index = torch.where(valid, target * k + preds, k * k)
        index = torch.where(out_of_range, k * k + 1, index)
        counts = torch.bincount(index.flatten(), minlength=k * k + 2)
        if counts[k * k + 1] > 0:
            raise ValueError(f"target holds values outside 0..{k - 1} that are not ignore_index")
        self.matrix += counts[: k * k].reshape(k, k)

    def _predictions(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            if x.ndim != 4:
                raise ValueError(f"logits must be N x C x H x W, got {tuple(x.shape)}")
            if x.shape[1] == 1:
                if self.num_classes != 2:
                    raise ValueError("one-logit outputs are scored as 2 classes")
                return (x[:, 0] > 0).long()
            if x.shape[1] != self.num_classes:
                raise ValueError(f"logits have {x.shape[1]} classes, expected {self.num_classes}")
            # Same first-index tie rule as argmax, several times faster over NCHW channels on CPU.
            return x.max(dim=1).indices
        if x.ndim != 3:
            raise ValueError(f"predictions must be N x H x W, got {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_classes):
            raise ValueError(f"predictions must be class indices in 0..{self.num_classes - 1}")
        return x.long()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another data shard) into this one."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge confusion matrices of different classes/ignore_index")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (summed, never averaged: a rank with
        fewer pixels must not count as much as one with more). Call once, before
        `compute()`; a no-op outside torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, MetricValue]:
        """Per-class lists `iou`, `dice`, `acc`, `precision`, `recall`; scalars `miou`, `mdice`,
        `pixel_acc`, and for 2 classes `fg_iou`, `fg_dice` (class 1). NaN where undefined."""
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        iou = _ratio(tp, tp + fp + fn)
        dice = _ratio(2 * tp, 2 * tp + fp + fn)
        recall = _ratio(tp, tp + fn)
        result: dict[str, MetricValue] = {
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "acc": recall.tolist(),
            "precision": _ratio(tp, tp + fp).tolist(),
            "recall": recall.tolist(),
            "miou": _nanmean(iou),
            "mdice": _nanmean(dice),
            "pixel_acc": _ratio(tp.sum(), m.sum()).item(),
        }
        if self.num_classes == 2:
            result["fg_iou"] = iou[1].item()
            result["fg_dice"] = dice[1].item()
        return result

    def to_json(self) -> dict[str, float | list[float | None] | None]:
        """`compute()` with NaN as None, for `json.dumps` (strict JSON has no NaN)."""
        return {key: _json_safe(value) for key, value in self.compute().items()}


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator, math.nan)


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if defined.numel() else math.nan


def _json_safe(value: MetricValue) -> float | list[float | None] | None:
    if isinstance(value, list):
        return [None if math.isnan(v) else v for v in value]
    return None if math.isnan(value) else value
