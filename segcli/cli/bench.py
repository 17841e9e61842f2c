"""`seg bench`: measured images/s, latency, memory and FLOP efficiency of one architecture, or
of a matrix of variants with `--compare`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from segcli.cli._options import Backbone, Classes, Device, InChannels, Json


def bench(
    arch: Annotated[str, typer.Argument(help="Architecture, e.g. deeplabv3 or unet.")],
    backbone: Backbone = None,
    size: Annotated[str, typer.Option(help="Input size N or HxW.")] = "512",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 1,
    mode: Annotated[
        str,
        typer.Option(
            help="infer (seg predict's model call on a normalised batch) | end-to-end (PNG "
            "files decoded to label maps, as the Python API's predict_batch) | train "
            "(forward/backward/step)."
        ),
    ] = "infer",
    device: Device = "auto",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (autocast).")] = "fp32",
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="NHWC memory format.")
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Export to ONNX and time it in onnxruntime (CPU).")
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Time eager fp32, channels_last, bf16, compile and onnxruntime side by side.",
        ),
    ] = False,
    emulated: Annotated[
        bool,
        typer.Option(
            "--emulated",
            help="With --compare, also time bf16 on a CPU without native bf16 (several times "
            "slower than fp32 there; skipped by default).",
        ),
    ] = False,
    iters: Annotated[int, typer.Option(min=1, help="Timed iterations.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed iterations first.")] = 2,
    classes: Classes = 21,
    in_channels: InChannels = 3,
    json_output: Json = False,
) -> None:
    """Benchmark an architecture on random weights and input.

    Reports images/s, latency per batch (p50/p90/p99), peak memory (CUDA max allocated, or
    process peak RSS on CPU), GFLOPs per image, achieved GFLOP/s and its fraction of the
    device's dense (matmul and convolution) peak, which the command measures itself. With
    --compare: one table, fastest first, with each variant's speed-up and max abs difference
    from eager fp32."""
    from segcli.bench import BenchSpec, Variant, compare_matrix, run_bench
    from segcli.data import parse_size
    from segcli.device import resolve_device
    from segcli.errors import UsageError, as_flags

    if compare and (dtype != "fp32" or channels_last or compile or onnx):
        raise UsageError(
            "--compare runs its own variants; drop --dtype/--channels-last/--compile/--onnx"
        )
    spec = BenchSpec(
        arch=arch,
        backbone=backbone,
        size=parse_size(size),
        batch_size=batch_size,
        mode=mode,
        device=device,
        classes=classes,
        in_channels=in_channels,
        iters=iters,
        warmup=warmup,
    )
    variants = (
        compare_matrix(mode, resolve_device(device), include_emulated=emulated)
        if compare
        else [Variant(dtype, channels_last, compile, onnx)]
    )
    report = run_bench(spec, variants, log=lambda line: print(as_flags(line), file=sys.stderr))
    if json_output:
        print(json.dumps(report, indent=2))
        return
    _print_table(report, compare)


def _print_table(report: dict, compare: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    results = report["results"]
    first = results[0]
    height, width = report["size"]
    title = (
        f"{report['arch']}/{report['backbone']} {report['mode']} {height}x{width} "
        f"batch {report['batch_size']} on {report['device']} ({report['threads']} threads); "
        f"{first['gflops_per_image']:.1f} GFLOPs/image forward"
    )
    table = Table(title=title)
    columns = ["variant", "predict uses", "images/s", "p50 ms", "p90 ms", "p99 ms", "peak MB"]
    columns += ["GFLOP/s", "% peak"]
    if compare:
        columns += ["speed-up", "max |diff|", "argmax ="]
    columns.append("setup s")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        name = r["variant"] + (" (emulated)" if r["emulated"] else "")
        cells = [
            name,
            "yes" if r["default"] else "no",
            f"{r['images_per_s']:.2f}",
            *(f"{r['latency_ms'][q]:.1f}" for q in ("p50", "p90", "p99")),
            f"{r['peak_memory_mb']:.0f}",
            f"{r['achieved_gflops']:.1f}",
            f"{100 * r['peak_fraction']:.0f}% of {r['matmul_peak_gflops']:.0f}",
        ]
        if compare:
            diff = r["max_abs_diff"]
            agree = r["argmax_agreement"]
            cells += [
                f"{r['speedup']:.2f}x",
                "-" if diff is None else f"{diff:.2g}",
                "-" if agree is None else f"{100 * agree:.2f}%",
            ]
        cells.append(f"{r['setup_s']:.1f}")
        table.add_row(*cells)
    # Piped output gets a wide table instead of rich's 80 columns, which would cut the cells.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    print(f"memory: {first['memory_kind']}; % peak: of the measured dense peak, same dtype")
