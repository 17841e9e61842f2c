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

import torch
from bench_train import add_model_arguments, training_model, training_step

from segcli.bench import time_steps


def seconds_per_step(step, steps: int) -> float:
    """Mean seconds of `steps` timed steps (CPU: no device queue to wait for)."""
    return statistics.fmean(time_steps(step, steps, 0, lambda: None)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    eager = training_model(args, args.classes)
    compiled = torch.compile(copy.deepcopy(eager))
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    masks = torch.randint(0, args.classes, (args.batch_size, args.size, args.size))
    steps = {
        name: training_step(model, "ce+0.5*dice", args.classes, images, masks)
        for name, model in (("eager", eager), ("compiled", compiled))
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
