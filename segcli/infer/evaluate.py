"""Scoring a model on a dataset split: one confusion matrix over the whole split (never an
average of per-batch scores), optionally at each image's original size and with test-time
augmentation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from segcli.device import inference_mode
from segcli.infer.segmenter import Segmenter
from segcli.metrics import ConfusionMatrix

if TYPE_CHECKING:
    from segcli.data import ClassMapping, DatasetInfo


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # ConfusionMatrix.to_json()
    loss: float | None
    matrix: ConfusionMatrix


def scored_pairs(
    segmenter: Segmenter, images: torch.Tensor, masks: torch.Tensor | list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits restored to the mask's size, mask) for a batch: one pair for masks stacked at
    the model size, one per image for a list of masks at each image's original size."""
    logits = segmenter.logits(images)
    if isinstance(masks, list):
        pairs = [(one[None], mask[None]) for one, mask in zip(logits, masks, strict=True)]
    else:
        pairs = [(logits, masks)]
    restored = []
    for score, mask in pairs:
        mask = mask.to(segmenter.device, non_blocking=True)
        restored.append((segmenter.restore(score, mask.shape[-2:]), mask))
    return restored


@dataclass
class ScoringData:
    """A labelled split read the way a checkpoint's model was trained to see it."""

    loader: DataLoader
    images: list[Path]  # in the loader's order
    mapping: ClassMapping
    full_res: bool
    dataset: DatasetInfo  # every split as found in the data, before any held-out split


def scoring_data(
    segmenter: Segmenter,
    *,
    data: str | Path | None,
    split: str,
    batch_size: int = 8,
    workers: int | None = None,
    full_res: bool = False,
) -> ScoringData:
    """The loader of a dataset split for `segmenter` (default data: the bundled mock set):
    masks read through the checkpoint's class mapping, images at the model's size (or each at
    its own with `full_res`). A `val` split the dataset lacks is the run's own held-out split
    when the checkpoint's folder saved one."""
    from segcli.data import (
        ClassMapping,
        SegmentationDataset,
        build_loader,
        check_dataset,
        mock_root,
        native_masks_collate,
    )
    from segcli.device import data_workers
    from segcli.errors import UsageError

    info, device = segmenter.info, segmenter.device
    mapping = ClassMapping.from_dict(info.classes)
    found = check_dataset(data or mock_root(), mapping=mapping, required_splits=()).info
    data_info = found
    if split not in data_info.splits:
        # A run that held out its own val split (or trained one fold) saved it beside its
        # checkpoints: score on those images.
        from segcli.data.splits import SPLIT_FILE, load_split

        sources = segmenter.checkpoints
        saved = Path(sources[0]).parent / SPLIT_FILE if len(sources) == 1 else None
        if split != "val" or saved is None or not saved.is_file():
            have = ", ".join(data_info.splits)
            raise UsageError(f"`split` {split}: the dataset has no {split} split (found: {have})")
        held_out = load_split(saved, data_info.root).val
        data_info = dataclasses.replace(data_info, splits={split: held_out})
    spec = info.spec
    # A patch model sees each whole image at its training scale: scored at the image's own
    # size, one image per batch (sizes differ; its windows are batched instead).
    whole_images = segmenter.size is None
    full_res = full_res or whole_images
    dataset = SegmentationDataset(
        data_info,
        split,
        size=segmenter.size,
        in_channels=spec.in_channels,
        augment=None,
        mean=spec.mean,
        std=spec.std,
        native_masks=full_res,
        scale=segmenter.scale if whole_images else None,
    )
    loader = build_loader(
        dataset,
        1 if whole_images else batch_size,
        shuffle=False,
        workers=data_workers(workers, device),
        seed=0,
        device_type=device.type,
        collate_fn=native_masks_collate if full_res else None,
    )
    images = [image for image, _ in data_info.pairs(split)]
    return ScoringData(loader, images, mapping, full_res, found)


def evaluate(
    segmenter: Segmenter,
    loader: DataLoader,
    *,
    scored_classes: int,
    ignore_index: int,
    criterion: nn.Module | None = None,
    distributed: bool = False,
) -> EvalResult:
    """Score `segmenter` on `loader`, whose batches are (images, masks): masks stacked at the
    model size, or a list of masks at each image's original size (`native_masks_collate`), where
    each image's logits are restored to its mask's size and labelled exactly as `seg predict`
    does before writing."""
    device = segmenter.device
    matrix = ConfusionMatrix(scored_classes, ignore_index, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum, images
    with inference_mode(segmenter.model):
        for images, masks in loader:
            for score, mask in scored_pairs(segmenter, images, masks):
                if criterion is not None:
                    loss_sum[0] += criterion(score, mask).double() * len(score)
                    loss_sum[1] += len(score)
                matrix.update(segmenter.labels(score), mask)
    if distributed:
        matrix.all_reduce()
        torch.distributed.all_reduce(loss_sum)
    loss = (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else None
    return EvalResult(matrix.to_json(), loss, matrix)


def evaluate_checkpoint(
    checkpoint: str | Path | Sequence[str | Path],
    *,
    data: str | None = None,
    split: str = "val",
    batch_size: int = 8,
    device_name: str = "auto",
    amp: str = "auto",
    full_res: bool = False,
    tta: bool = False,
    tile: int | None = None,
    overlap: float = 0.25,
    threshold: float | None = None,
    workers: int | None = None,
    compile: bool = False,
    runtime: str = "torch",
    loaded: Callable[[Segmenter], None] | None = None,
) -> dict[str, Any]:
    """Rebuild a model from its checkpoint (or exported ONNX file) alone and score it on a split
    of a dataset (the checkpoint's class mapping decides how masks are read), through the same
    Segmenter `seg predict` uses. Several checkpoints, or a run folder of folds, are scored as
    one ensemble (`Segmenter.load`). `loaded(segmenter)` is called before scoring starts, for a
    CLI to say what it loaded."""
    segmenter = Segmenter.load(
        checkpoint,
        device=device_name,
        amp=amp,
        compile=compile,
        runtime=runtime,
        tta=tta,
        tile=tile,
        overlap=overlap,
        threshold=threshold,
        window_batch=batch_size,
    )
    if loaded is not None:
        loaded(segmenter)
    info = segmenter.info
    scoring = scoring_data(
        segmenter,
        data=data,
        split=split,
        batch_size=batch_size,
        workers=workers,
        full_res=full_res,
    )
    result = evaluate(
        segmenter,
        scoring.loader,
        scored_classes=info.scored_classes,
        ignore_index=info.ignore_index,
    )
    ensemble = len(segmenter.checkpoints) > 1
    return {
        # As given: one argument, or several joined as on the command line.
        "checkpoint": (
            str(checkpoint)
            if isinstance(checkpoint, (str, Path))
            else " ".join(map(str, checkpoint))
        ),
        "checkpoints": [str(path) for path in segmenter.checkpoints],
        "runtime": segmenter.runtime.name,
        "split": split,
        "images": len(scoring.images),
        "full_res": scoring.full_res,
        "tta": tta,
        "tile": tile,
        "threshold": segmenter.threshold if info.binary else None,
        "precision": segmenter.precision.name,
        "class_names": scoring.mapping.names,
        # The members of an ensemble may stop at different epochs.
        "epoch": None if ensemble else info.epoch,
        **result.metrics,
        # rows: true class, columns: predicted class; ignored pixels are not counted
        "confusion_matrix": result.matrix.matrix.cpu().tolist(),
    }
