"""segcli against reference implementations, timed in the same run, printed as ratios.

    python benchmarks/bench_reference.py --size 512 --iters 10

torchvision's deeplabv3_resnet50 and fcn_resnet50 are the same networks as segcli's deeplabv3 and
fcn on resnet50: torchvision's state dict is loaded into segcli's model by renaming prefixes, so
both run the same weights. The variants are timed round-robin (one call of each per round), so
load from other processes on the machine slows them all alike and the ratios stay meaningful.
segmentation_models_pytorch's Unet / DeepLabV3Plus on resnet34 are added when it is installed.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from segcli.bench import randomise_batchnorm
from segcli.device import Precision, resolve_precision, to_device
from segcli.infer.inference import class_logits
from segcli.models import build_model

PREFIXES = {"backbone.": "encoder.body.", "classifier.": "head.", "aux_classifier.": "aux_head."}


def torchvision_to_segcli(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        prefix = next(p for p in PREFIXES if key.startswith(p))
        renamed[PREFIXES[prefix] + key.removeprefix(prefix)] = value
    return renamed


def interleaved(
    runs: dict[str, Callable[[], torch.Tensor]], iters: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each run, timed round-robin."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def pair(arch: str, size: int, iters: int, warmup: int, classes: int) -> None:
    from torchvision.models import segmentation as tvseg

    from segcli.checkpoint import CheckpointInfo, model_build_config
    from segcli.export import load_exported, traceable, write_onnx

    torch.manual_seed(0)
    reference = getattr(tvseg, f"{arch}_resnet50")(
        weights=None, weights_backbone=None, aux_loss=False, num_classes=classes
    )
    randomise_batchnorm(reference)
    reference.eval()
    ours = build_model(arch, "resnet50", 3, classes)
    ours.load_state_dict(torchvision_to_segcli(reference.state_dict()))
    ours.eval()
    cpu = torch.device("cpu")
    default = resolve_precision("auto", cpu)  # what seg predict / seg eval use
    ours_cl = build_model(arch, "resnet50", 3, classes)
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl = ours_cl.eval().to(memory_format=torch.channels_last)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))

    info = CheckpointInfo(model_build_config(ours), {"names": []}, (size, size), (0,), (1,))
    path = f"/tmp/segcli-bench-{arch}.onnx"
    with torch.no_grad(), traceable(ours) as friendly:
        write_onnx(friendly, info, images, path, dynamic=False)
    onnx_run = load_exported(path, "onnx")

    def torchvision_fp32() -> torch.Tensor:
        with torch.inference_mode():
            return reference(images)["out"]

    def segcli_fp32() -> torch.Tensor:
        with torch.inference_mode():
            return ours(images)

    def segcli_default() -> torch.Tensor:
        with torch.inference_mode():
            return class_logits(ours_cl, images, precision=default, device=cpu)

    def segcli_onnx() -> torch.Tensor:
        return onnx_run(images)

    runs = {
        "torchvision eager fp32": torchvision_fp32,
        "segcli eager fp32": segcli_fp32,
        f"segcli default ({default.name}, channels_last={default.channels_last})": segcli_default,
        "segcli onnxruntime fp32": segcli_onnx,
    }
    seconds = interleaved(runs, iters, warmup)
    base = seconds["torchvision eager fp32"]
    expected = torchvision_fp32().argmax(1)
    print(f"\n{arch}_resnet50, {size}x{size}, batch 1, {torch.get_num_threads()} threads")
    for name, run in runs.items():
        agree = (run().argmax(1) == expected).float().mean().item()
        print(
            f"  {name:<45} {1 / seconds[name]:6.2f} images/s  {base / seconds[name]:5.2f}x  "
            f"argmax equal on {100 * agree:6.2f}% of pixels"
        )


def smp_models(size: int, iters: int, warmup: int) -> None:
    """smp's Unet and DeepLabV3Plus on resnet34 against segcli's models of the same family. They
    are not the same networks (smp's UNet decoder is narrower than the published ResUNet34's;
    smp's ASPP is depthwise-separable), so besides images/s each model's forward GFLOPs and
    achieved GFLOP/s are printed: the speed ratio says which is faster to run, the GFLOP/s ratio
    says how efficiently each runs the work it has. Both in eager fp32 and in segcli's default
    inference precision on this CPU (bf16 autocast + channels_last), applied to both."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("\nsegmentation_models_pytorch not installed: Unet/DeepLabV3Plus comparison skipped")
        return
    from segcli.models.summary import forward_gflops

    cpu = torch.device("cpu")
    images = torch.randn(1, 3, size, size)
    pairs = {
        "Unet resnet34": (smp.Unet("resnet34", encoder_weights=None), ("unet", "resnet34")),
        "DeepLabV3Plus resnet34 (output stride 16)": (
            smp.DeepLabV3Plus("resnet34", encoder_weights=None),
            ("deeplabv3p", "resnet34"),
        ),
    }
    for name, (theirs, (arch, backbone)) in pairs.items():
        ours = build_model(arch, backbone, 3, 1).eval()
        theirs.eval()
        flops = {
            "smp": forward_gflops(theirs, 3, (size, size)),
            "segcli": forward_gflops(ours, 3, (size, size)),
        }
        for precision in (Precision(None, False), resolve_precision("auto", cpu)):
            models = {"smp": theirs, "segcli": ours}
            if precision.channels_last:
                models = {
                    k: copy.deepcopy(m).to(memory_format=torch.channels_last)
                    for k, m in models.items()
                }
            x = to_device(images, cpu, precision)

            def run(
                model: nn.Module, x: torch.Tensor = x, precision: Precision = precision
            ) -> Callable[[], torch.Tensor]:
                def call() -> torch.Tensor:
                    with torch.inference_mode(), precision.autocast(cpu):
                        return model(x)

                return call

            seconds = interleaved({k: run(m) for k, m in models.items()}, iters, warmup)
            print(
                f"\n{name}, {precision.name}{' channels_last' if precision.channels_last else ''}:"
            )
            for library in models:
                print(
                    f"  {library:<7} {1 / seconds[library]:6.2f} images/s  "
                    f"{flops[library]:7.1f} GFLOPs/image  "
                    f"{flops[library] / seconds[library]:6.1f} GFLOP/s"
                )
            rate = {library: flops[library] / seconds[library] for library in models}
            print(
                f"  segcli/smp: {seconds['smp'] / seconds['segcli']:.2f}x images/s, "
                f"{rate['segcli'] / rate['smp']:.2f}x GFLOP/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument(
        "--arch", nargs="*", default=["deeplabv3", "fcn"], help="none: only the smp comparison"
    )
    args = parser.parse_args()
    for arch in args.arch:
        pair(arch, args.size, args.iters, args.warmup, args.classes)
    smp_models(args.size, args.iters, args.warmup)


if __name__ == "__main__":
    main()
