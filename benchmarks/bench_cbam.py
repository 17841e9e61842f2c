"""CBAM's forward + backward time: segcli's `CBAM` against the paper's formulation written out
plainly (adaptive average/max pooling, channel mean and amax), at the decoder maps of the
default ResUNet18 at 256x256, batch 8, fp32 channels_last.

    python benchmarks/bench_cbam.py [--repeats 5]

Both run round-robin in one process on the same module and inputs, so host drift hits both
alike; each figure is the best of `--repeats` rounds of 5 forward + backward passes. Before
timing, the two are checked to give the same output and input gradient. Name the CPU
(`lscpu`) beside the figures.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from segcli.models.attention import CBAM

# (channels, side) of the fast decoder's five blocks at 256x256 input.
DECODER_MAPS = [(16, 256), (32, 128), (64, 64), (128, 32), (256, 16)]


def paper_cbam(module: CBAM, x: torch.Tensor) -> torch.Tensor:
    """Woo et al.'s CBAM with segcli's gate gain, in the plain formulation."""
    avg = module.mlp(F.adaptive_avg_pool2d(x, 1))
    peak = module.mlp(F.adaptive_max_pool2d(x, 1))
    x = x * (module.gate_gain * torch.sigmoid(avg + peak))
    descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    return x * (module.gate_gain * torch.sigmoid(module.spatial(descriptor)))


def forward_backward_seconds(run, x: torch.Tensor, grad: torch.Tensor, passes: int = 5) -> float:
    started = time.perf_counter()
    for _ in range(passes):
        leaf = x.detach().requires_grad_()
        run(leaf).backward(grad)
    return (time.perf_counter() - started) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    total = {"segcli": 0.0, "paper": 0.0}
    for channels, side in DECODER_MAPS:
        module = CBAM(channels).to(memory_format=torch.channels_last)
        for parameter in module.parameters():  # trained-looking gates, not the open start
            torch.nn.init.normal_(parameter, std=0.1)
        shape = (args.batch_size, channels, side, side)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        outputs = [module(leaves[0]), paper_cbam(module, leaves[1])]
        for output in outputs:
            output.backward(grad)
        torch.testing.assert_close(outputs[0], outputs[1])
        torch.testing.assert_close(leaves[0].grad, leaves[1].grad)
        runs = {"segcli": module, "paper": lambda leaf, m=module: paper_cbam(m, leaf)}
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = min(best[name], forward_backward_seconds(run, x, grad))
        for name in runs:
            total[name] += best[name]
        print(
            f"{channels:3d} x {side:3d}x{side:<3d}  segcli {best['segcli'] * 1e3:7.1f} ms  "
            f"paper {best['paper'] * 1e3:7.1f} ms  ratio {best['segcli'] / best['paper']:.2f}",
            flush=True,
        )
    print(
        f"all five blocks: segcli {total['segcli'] * 1e3:.1f} ms, paper {total['paper'] * 1e3:.1f}"
        f" ms per forward + backward, ratio {total['segcli'] / total['paper']:.2f}"
    )


if __name__ == "__main__":
    main()
