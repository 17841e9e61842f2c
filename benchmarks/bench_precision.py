"""How far segcli's default inference precision moves a trained model's predictions from fp32.

    python benchmarks/bench_precision.py run/best.safetensors --data DATASET [--split val]

The same checkpoint runs twice over a split, as `seg eval` feeds it (resized to the checkpoint's
input size, normalised): eager fp32 NCHW, and the default `--amp auto` path (on CPUs with native
bf16: bf16 autocast + channels_last). Printed: the share of pixels whose argmax agrees and the
mIoU of each against the ground truth. bf16 logits differ from fp32 by more than 1e-2, so the
judge is the predictions, not the logits (SPEC target: >= 99.5% agreement, mIoU within 0.2
points).
"""

from __future__ import annotations

import argparse
import json

import torch

from segcli.data import ClassMapping, SegmentationDataset, build_loader, check_dataset
from segcli.infer.segmenter import Segmenter
from segcli.metrics import ConfusionMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    fp32 = Segmenter.load(args.checkpoint, device="cpu", amp="off")
    default = Segmenter.load(args.checkpoint, device="cpu", amp="auto")
    info = fp32.info
    mapping = ClassMapping.from_dict(info.classes)
    report = check_dataset(args.data, mapping=mapping, required_splits=(args.split,))
    dataset = SegmentationDataset(
        report.info,
        args.split,
        size=info.input_size,
        in_channels=info.model["in_channels"],
        augment=None,
        mean=info.mean,
        std=info.std,
    )
    loader = build_loader(
        dataset, args.batch_size, shuffle=False, workers=0, seed=0, device_type="cpu"
    )
    matrices = {name: ConfusionMatrix(info.scored_classes, info.ignore_index) for name in "ab"}
    agree = pixels = 0
    with torch.inference_mode():
        for images, masks in loader:
            labels = []
            for segmenter, matrix in ((fp32, matrices["a"]), (default, matrices["b"])):
                predicted = segmenter.labels(segmenter.logits(images))
                matrix.update(predicted, masks)
                labels.append(predicted)
            agree += int((labels[0] == labels[1]).sum())
            pixels += labels[0].numel()
    fp32_miou = matrices["a"].to_json()["miou"]
    default_miou = matrices["b"].to_json()["miou"]
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "model": f"{info.model['arch']}/{info.model['backbone']}",
                "input_size": list(info.input_size),
                "images": len(dataset),
                "default_precision": default.precision.name,
                "channels_last": default.precision.channels_last,
                "argmax_agreement_percent": round(100 * agree / pixels, 3),
                "miou_fp32": round(fp32_miou, 5),
                "miou_default": round(default_miou, 5),
                "miou_difference_points": round(100 * (default_miou - fp32_miou), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
