"""Does `--compile` pay for training? One training step (forward, `ce+0.5*dice`, backward, fused
AdamW) of the same model eager and under `torch.compile`, timed alternately in one process.

    python benchmarks/bench_compile_train.py [--arch unet --backbone resnet18 --size 256]

Both models start from the same weights and use `--amp auto`'s precision and memory format.
Prints the compiled model's first step (the compile, cold or from inductor's on-disk cache),
then `--rounds` rounds of `--steps` steps of each, alternating so that load from other processes
hurts both alike, and the median per-step ratio compiled / eager (below 1: compile is faster).
Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from segcli.device import resolve_precision, to_device
from segcli.losses import build_loss
from segcli.models import build_model
from segcli.train.optim import build_optimizer


def training_step(model: torch.nn.Module, classes: int, images, masks, precision):
    cpu = torch.device("cpu")
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=1e-4)
    criterion = build_loss("ce+0.5*dice", num_classes=classes)

    def step() -> None:
        with precision.autocast(cpu):
            loss = criterion(model(to_device(images, cpu, precision)), masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def seconds_per_step(step, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    precision = resolve_precision("auto", torch.device("cpu"))
    eager = build_model(args.arch, args.backbone, in_channels=3, classes=args.classes).train()
    if precision.channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager))
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    masks = torch.randint(0, args.classes, (args.batch_size, args.size, args.size))
    steps = {
        "eager": training_step(eager, args.classes, images, masks, precision),
        "compiled": training_step(compiled, args.classes, images, masks, precision),
    }
    print(f"compiled first step (compile included): {seconds_per_step(steps['compiled'], 1):.1f} s")
    for step in steps.values():
        seconds_per_step(step, 2)
    ratios = []
    for round_index in range(args.rounds):
        times = {name: seconds_per_step(step, args.steps) for name, step in steps.items()}
        ratios.append(times["compiled"] / times["eager"])
        print(
            f"round {round_index + 1}: eager {times['eager']:.3f} s/step, "
            f"compiled {times['compiled']:.3f} s/step, ratio {ratios[-1]:.2f}"
        )
    print(f"median ratio compiled / eager: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
