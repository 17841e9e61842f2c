"""Scoring a model on a dataset split: one confusion matrix over the whole split (SPEC.md
section 2), optionally at each image's original size and with test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segcli.device import Precision, inference_mode
from segcli.infer.inference import class_logits
from segcli.metrics import ConfusionMatrix


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # ConfusionMatrix.to_json()
    loss: float | None
    matrix: ConfusionMatrix


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    scored_classes: int,
    ignore_index: int,
    device: torch.device,
    precision: Precision,
    criterion: nn.Module | None = None,
    tta: bool = False,
    distributed: bool = False,
) -> EvalResult:
    """Score `model` on `loader`, whose batches are (images, masks): masks stacked at the model
    size, or a list of masks at each image's original size (`native_masks_collate`), where each
    image's scores are resized to its mask exactly as `seg predict` resizes them before
    writing (bilinear, then argmax or threshold)."""
    matrix = ConfusionMatrix(scored_classes, ignore_index, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum, images
    with inference_mode(model):
        for images, masks in loader:
            scores = class_logits(model, images, precision=precision, device=device, tta=tta)
            pairs = (
                [(score[None], mask[None]) for score, mask in zip(scores, masks, strict=True)]
                if isinstance(masks, list)
                else [(scores, masks)]
            )
            for score, mask in pairs:
                mask = mask.to(device, non_blocking=True)
                if score.shape[-2:] != mask.shape[-2:]:
                    score = F.interpolate(
                        score, size=mask.shape[-2:], mode="bilinear", align_corners=False
                    )
                if criterion is not None:
                    loss_sum[0] += criterion(score, mask).double() * len(score)
                    loss_sum[1] += len(score)
                matrix.update(score, mask)
    if distributed:
        matrix.all_reduce()
        torch.distributed.all_reduce(loss_sum)
    loss = (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else None
    return EvalResult(matrix.to_json(), loss, matrix)


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data: str | None = None,
    split: str = "val",
    batch_size: int = 8,
    device_name: str = "auto",
    amp: str = "auto",
    full_res: bool = False,
    tta: bool = False,
    workers: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Rebuild a model from its checkpoint alone and score it on a split of a dataset (the
    checkpoint's class mapping decides how masks are read)."""
    from segcli.data import (
        ClassMapping,
        SegmentationDataset,
        build_loader,
        check_dataset,
        mock_root,
        native_masks_collate,
    )
    from segcli.device import data_workers, resolve_device
    from segcli.errors import UsageError
    from segcli.infer.inference import load_for_inference

    device = resolve_device(device_name)
    model, info, precision = load_for_inference(checkpoint, device, amp, compile)
    mapping = ClassMapping.from_dict(info.classes)
    report = check_dataset(data or mock_root(), mapping=mapping, required_splits=(split,))
    if split not in report.info.splits:
        raise UsageError(f"--split {split}: the dataset has no {split}/ folder")
    spec = info.spec
    dataset = SegmentationDataset(
        report.info,
        split,
        size=spec.size,
        in_channels=spec.in_channels,
        augment=None,
        mean=spec.mean,
        std=spec.std,
        native_masks=full_res,
    )
    loader = build_loader(
        dataset,
        batch_size,
        shuffle=False,
        workers=data_workers(workers, device),
        seed=0,
        device_type=device.type,
        collate_fn=native_masks_collate if full_res else None,
    )
    result = evaluate(
        model,
        loader,
        scored_classes=info.scored_classes,
        ignore_index=info.ignore_index,
        device=device,
        precision=precision,
        tta=tta,
    )
    return {
        "checkpoint": str(checkpoint),
        "split": split,
        "images": len(dataset),
        "full_res": full_res,
        "tta": tta,
        "precision": precision.name,
        "class_names": mapping.names,
        "epoch": info.epoch,
        **result.metrics,
        # rows: true class, columns: predicted class; ignored pixels are not counted
        "confusion_matrix": result.matrix.matrix.cpu().tolist(),
    }
