"""Scoring a model on a dataset split: one confusion matrix over the whole split (SPEC.md
section 2), optionally at each image's original size and with test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segcli.engine.device import Precision, inference_mode, to_device
from segcli.engine.inference import class_probabilities, labels_from_probabilities
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
    input_size: tuple[int, int] | None = None,
    distributed: bool = False,
) -> EvalResult:
    """Score `model` on `loader`. With `input_size`, images (at their original size) are
    resized to it for the model and the logits resized back to each mask's size."""
    matrix = ConfusionMatrix(scored_classes, ignore_index, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum, images
    with inference_mode(model):
        for images, masks in loader:
            masks = masks.to(device, non_blocking=True)
            original = masks.shape[-2:]
            if input_size is not None:
                images = F.interpolate(
                    images, size=input_size, mode="bilinear", align_corners=False
                )
            if tta:
                scores = class_probabilities(
                    model, images, precision=precision, device=device, tta=True
                )
            else:
                with precision.autocast(device):
                    scores = model(to_device(images, device, precision)).float()
            if scores.shape[-2:] != original:
                scores = F.interpolate(scores, size=original, mode="bilinear", align_corners=False)
            if criterion is not None and not tta:
                loss_sum[0] += criterion(scores, masks).double() * len(images)
                loss_sum[1] += len(images)
            if tta:
                matrix.update(labels_from_probabilities(scores), masks)
            else:
                matrix.update(scores, masks)
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
        batches_by_size,
        build_loader,
        check_dataset,
        image_sizes,
        mock_root,
    )
    from segcli.engine.device import data_workers, resolve_device
    from segcli.engine.inference import load_for_inference
    from segcli.errors import UsageError

    device = resolve_device(device_name)
    model, info, precision = load_for_inference(checkpoint, device, amp, compile)
    mapping = ClassMapping.from_dict(info.classes)
    report = check_dataset(data or mock_root(), mapping=mapping, required_splits=(split,))
    if split not in report.info.splits:
        raise UsageError(f"--split {split}: the dataset has no {split}/ folder")
    dataset = SegmentationDataset(
        report.info,
        split,
        size=None if full_res else info.input_size,
        in_channels=info.model["in_channels"],
        augment=None,
        mean=info.mean,
        std=info.std,
    )
    # At original sizes, only images of one size can share a batch.
    same_size = (
        batches_by_size(image_sizes([image for image, _ in dataset.pairs]), batch_size)
        if full_res
        else None
    )
    loader = build_loader(
        dataset,
        batch_size,
        shuffle=False,
        workers=data_workers(workers, device),
        seed=0,
        device_type=device.type,
        batch_sampler=same_size,
    )
    result = evaluate(
        model,
        loader,
        scored_classes=info.scored_classes,
        ignore_index=info.ignore_index,
        device=device,
        precision=precision,
        tta=tta,
        input_size=info.input_size if full_res else None,
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
    }
