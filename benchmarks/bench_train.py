"""`seg train` images/s against a bare forward/backward/step loop on the same model, batch and
precision (target: the engine and data pipeline cost at most 10%).

    python benchmarks/bench_train.py [--arch unet --backbone resnet18 --size 256 --batch-size 8]

`seg train` runs as users run it (a subprocess, the default 2 DataLoader workers and
augmentation) on a generated mock-style dataset of `--images` JPEGs of 180-320 px, resized to
`--size`; its rate is the training-epoch rate it records in metrics.jsonl (data loading waits
included, validation excluded), epoch 1 (kernel selection) left out. The bare loop is the same
model, AdamW, cross-entropy and `--amp auto` precision on one ready batch in this process. The
two alternate `--repeats` times and the best of each is kept, so load from other processes
hurts both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from segcli.data.mock import generate
from segcli.device import resolve_precision, to_device
from segcli.losses import build_loss
from segcli.models import build_model
from segcli.train.optim import build_optimizer


def seg_train_rate(args: argparse.Namespace, data: Path, out: Path) -> float:
    command = [
        sys.executable, "-m", "segcli", "train", args.arch, "--backbone", args.backbone,
        "--data", str(data), "--size", str(args.size), "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs), "--loss", "ce", "--lr", "1e-3", "--out", str(out),
        "--json",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [record["images_per_second"] for record in records[1:]]
    return sum(rates) / len(rates)


def training_step(
    model: torch.nn.Module, loss: str, classes: int, images: torch.Tensor, masks: torch.Tensor
) -> Callable[[], None]:
    """One bare training step (forward under `--amp auto`'s precision, backward, fused AdamW)
    on one ready batch, with nothing of `seg train` around it."""
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    optimizer = build_optimizer(model, "adamw", lr=1e-3)
    criterion = build_loss(loss, num_classes=classes)

    def step() -> None:
        with precision.autocast(cpu):
            value = criterion(model(to_device(images, cpu, precision)), masks)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value.item()

    return step


def training_model(args: argparse.Namespace, classes: int) -> torch.nn.Module:
    """The benchmarked model in training mode, in `--amp auto`'s memory format."""
    model = build_model(args.arch, args.backbone, in_channels=3, classes=classes).train()
    if resolve_precision("auto", torch.device("cpu")).channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)


def bare_loop_rate(args: argparse.Namespace, steps: int) -> float:
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    masks = torch.randint(0, 3, (args.batch_size, args.size, args.size))
    step = training_step(training_model(args, 3), "ce", 3, images, masks)
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * args.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        data = generate(Path(temporary) / "data", splits={"train": args.images, "val": 4})
        train_rates, bare_rates = [], []
        steps = args.images // args.batch_size * (args.epochs - 1)
        for repeat in range(args.repeats):
            out = Path(temporary) / f"run{repeat}"
            train_rates.append(seg_train_rate(args, data, out))
            bare_rates.append(bare_loop_rate(args, steps))
    report = {
        "model": f"{args.arch}/{args.backbone}",
        "size": args.size,
        "batch_size": args.batch_size,
        "train_images": args.images,
        "precision": resolve_precision("auto", torch.device("cpu")).name,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "seg_train_images_per_s": [round(rate, 3) for rate in train_rates],
        "bare_loop_images_per_s": [round(rate, 3) for rate in bare_rates],
        "ratio_best": round(max(train_rates) / max(bare_rates), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
