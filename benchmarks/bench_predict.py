"""End-to-end `seg predict` images/s on a folder of 512x512 PNGs against the model-only forward
rate at the same batch size and precision (target: ratio >= 0.9).

End to end = the predict pipeline: decoding (in DataLoader workers or, by default on CPUs with
few cores, the main process), normalisation, forward, argmax, PNG encoding and the atomic
write, on the same warmed-up model object as the model-only run (`model(batch)` on a ready
tensor under the same autocast and memory format). The two are measured alternately and the
best of each is kept, so other load on the machine hurts both alike. One cold `predict()`
call (what one CLI run costs per image: the first batch's one-off kernel selection included,
model loading excluded) is reported beside it.

    python benchmarks/bench_predict.py [--images 32] [--batch-size 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segcli.checkpoint import CheckpointInfo, model_build_config, save_checkpoint
from segcli.cli.output import (
    PredictionWriter,
    Streams,
    Summary,
    expand_inputs,
    plan_jobs,
    predict,
)
from segcli.data import ClassMapping
from segcli.device import data_workers
from segcli.infer.predict import PredictOptions, Predictor
from segcli.infer.segmenter import Segmenter
from segcli.models import build_model

SIZE = 512


def write_images(folder: Path, count: int) -> None:
    """Photo-like PNGs (smooth gradients plus noise), so decoding costs what real files cost."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, SIZE, dtype=np.float32)
    for index in range(count):
        base = ramp[None, :, None] * rng.uniform(0.3, 1, 3) + ramp[:, None, None] * 0.2
        noisy = base + rng.normal(0, 12, (SIZE, SIZE, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img_{index:03}.png")


def cpu_seconds() -> float:
    """CPU time of this process's threads plus its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Rate:
    """Images per wall second and per CPU second of a timed block. With other jobs on the
    machine the wall rate swings with their load; CPU seconds count only our own work."""

    def __init__(self, images: int) -> None:
        self.images = images

    def __enter__(self) -> Rate:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.per_wall = self.images / (time.perf_counter() - self.wall)
        self.per_cpu = self.images / (cpu_seconds() - self.cpu)


def forward_rate(segmenter: Segmenter, batch: int, batches: int) -> Rate:
    """The model alone on preprocessed images, through the segmenter's run step (device,
    precision, memory layout) and nothing else."""
    images = torch.randn(batch, 3, SIZE, SIZE)
    with torch.inference_mode():
        segmenter.logits(images)  # warm-up: oneDNN picks and caches its kernels on the first call
        with Rate(batch * batches) as rate:
            for _ in range(batches):
                segmenter.logits(images)
    return rate


def steady_rate(predictor: Predictor, writer: PredictionWriter, folder: Path) -> Rate:
    """The predict pipeline (DataLoader decoding, forward, resize back, PNG writes) on the
    already warmed-up model: the per-image rate of a long run."""
    found = expand_inputs([str(folder)], io.StringIO())
    jobs, _, _ = plan_jobs(found, predictor.options, sys.stderr)
    with Rate(len(jobs)) as rate:
        writer.write_all(predictor, jobs, Summary())
    return rate


def quiet_streams() -> Streams:
    return Streams(stdin=io.StringIO(), lines=io.StringIO(), log=io.StringIO())


def cold_rate(checkpoint: Path, folder: Path, options: PredictOptions) -> float:
    """One whole `predict` call as the CLI makes it, timed by predict itself: loading excluded,
    the first batch's one-off kernel selection (oneDNN) included."""
    summary = predict(checkpoint, [str(folder)], options, quiet_streams())
    return summary.written / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="default: seg predict's")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        folder = root / "images"
        folder.mkdir()
        write_images(folder, args.images)
        model = build_model(args.arch, args.backbone, classes=3)
        info = CheckpointInfo(
            model=model_build_config(model),
            classes=ClassMapping("index", ["background", "a", "b"]).to_dict(),
            input_size=(SIZE, SIZE),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        )
        checkpoint = root / "model.safetensors"
        save_checkpoint(checkpoint, model, info)
        segmenter = Segmenter.load(checkpoint, device="auto", amp="auto")
        device, precision = segmenter.device, segmenter.precision

        options = PredictOptions(
            out=root / "out", batch_size=args.batch_size, workers=args.workers, overwrite=True
        )
        predictor = Predictor(segmenter, options)
        writer = PredictionWriter(segmenter, options, quiet_streams())
        batches = args.images // args.batch_size
        forward: list[Rate] = []
        end_to_end: list[Rate] = []
        for _ in range(args.repeats):
            forward.append(forward_rate(segmenter, args.batch_size, batches))
            end_to_end.append(steady_rate(predictor, writer, folder))
        cold = cold_rate(checkpoint, folder, options)
        best_forward = max(rate.per_wall for rate in forward)
        report = {
            "model": f"{args.arch}-{args.backbone}",
            "size": SIZE,
            "images": args.images,
            "batch_size": args.batch_size,
            "workers": data_workers(args.workers, device),
            "precision": precision.name,
            "channels_last": precision.channels_last,
            "device": device.type,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "forward_images_per_s": [round(rate.per_wall, 3) for rate in forward],
            "predict_images_per_s": [round(rate.per_wall, 3) for rate in end_to_end],
            "ratio_best_wall": round(max(r.per_wall for r in end_to_end) / best_forward, 3),
            "forward_images_per_cpu_s": [round(rate.per_cpu, 3) for rate in forward],
            "predict_images_per_cpu_s": [round(rate.per_cpu, 3) for rate in end_to_end],
            "ratio_best_cpu": round(
                max(r.per_cpu for r in end_to_end) / max(r.per_cpu for r in forward), 3
            ),
            "cold_predict_images_per_s": round(cold, 3),
            "cold_ratio_wall": round(cold / best_forward, 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
