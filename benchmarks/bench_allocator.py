"""Training speed with and without `segcli.device.keep_freed_memory` (glibc keeps freed memory
instead of unmapping every tensor above 32 MB when it is freed).

    python benchmarks/bench_allocator.py --size 256 --batch-size 8 --steps 10 --pairs 4

Each arm runs in its own process (the allocator setting is process-wide and cannot be undone),
alternating default / kept, so a busy neighbour slows both alike: a ResUNet18 (segcli's default
UNet) trained in fp32 channels_last with fused AdamW, after two warm-up steps. Printed per run:
training images/s, page faults and kernel (sys) seconds per step; then the mean ratio.
Name the CPU (`lscpu`) beside the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = """
import json, resource, sys, time
import torch, torch.nn.functional as F
from segcli.models import build_model
from segcli.device import keep_freed_memory
size, batch, steps, kept = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if kept:
    assert keep_freed_memory()
torch.manual_seed(0)
model = build_model("unet", "resnet18", 3, 8).to(memory_format=torch.channels_last).train()
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
masks = torch.randint(0, 8, (batch, size, size))
def step():
    loss = F.cross_entropy(model(images), masks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "images_per_second": steps * batch / seconds,
    "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
    "sys_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"default": [], "kept": []}
    for _ in range(args.pairs):
        for arm in results:
            output = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(args.size),
                    str(args.batch_size),
                    str(args.steps),
                    "1" if arm == "kept" else "0",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            results[arm].append(result)
            print(
                f"{arm:8s} {result['images_per_second']:5.2f} images/s, "
                f"{result['faults_per_step']:9.0f} page faults/step, "
                f"{result['sys_seconds_per_step']:.3f} s sys/step",
                flush=True,
            )
    ratios = [
        kept["images_per_second"] / default["images_per_second"]
        for default, kept in zip(results["default"], results["kept"], strict=True)
    ]
    print(
        f"kept / default images/s per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"mean {sum(ratios) / len(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
