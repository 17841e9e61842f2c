"""Inference runtimes side by side: `seg predict`'s model step on each `--runtime` against
torchvision's own DeepLabv3-ResNet50 in eager fp32 (NCHW), in one process, round-robin.

    python benchmarks/bench_runtimes.py [--size 512] [--batch-size 1] [--repeats 5]

Every variant runs the same forward a user's `seg predict` would (`Segmenter.logits` on a
preprocessed batch: autocast, memory format, the exported graph), best of `--repeats` rounds
taken round-robin so other load hurts all alike. `default` is what `seg predict` picks with no
flag on this host (`--runtime auto`, `--amp auto`). `onnxruntime int8` is the file
`seg export --int8` writes (same quantizer and settings), calibrated here on 8 other photo-like
images; its accuracy gate needs a labelled dataset, so score a trained checkpoint with
`seg export --int8` for that. Argmax agreement is against segcli's torch
fp32 logits on the same photo-like images. Prints one line per variant and writes JSON with
the CPU it ran on; name that CPU beside any figure you quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.segmentation import deeplabv3_resnet50

from segcli.bench import randomise_batchnorm
from segcli.checkpoint import CheckpointInfo, load_model, model_build_config, save_checkpoint
from segcli.data import ClassMapping
from segcli.device import Precision, cpu_has_native_bf16, host_key
from segcli.infer.onnx_model import INPUT_NAME, load_onnx
from segcli.infer.runtimes import cached_onnx, installed
from segcli.infer.segmenter import Segmenter
from segcli.models import build_model

CLASSES = 21
FP32_NCHW = Precision(None, channels_last=False)


def photo_batch(batch: int, size: int) -> torch.Tensor:
    """Normalised photo-like images: smooth gradients plus noise, not flat zeros, so argmax
    agreement is measured where the logits actually vary."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1.5, 1.5, size)
    base = ramp[None, None, :, None] * torch.rand(batch, 3, 1, 1, generator=generator)
    return (
        base
        + ramp[None, None, None, :] * 0.5
        + 0.3 * torch.randn(batch, 3, size, size, generator=generator)
    )


def write_checkpoint(folder: Path, size: int) -> Path:
    torch.manual_seed(0)
    model = build_model("deeplabv3", "resnet50", 3, CLASSES).eval()
    randomise_batchnorm(model)
    info = CheckpointInfo(
        model=model_build_config(model),
        classes=ClassMapping("index", [f"class_{i}" for i in range(CLASSES)]).to_dict(),
        input_size=(size, size),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    path = folder / "best.safetensors"
    save_checkpoint(path, model, info)
    return path


def nchw_segmenter(checkpoint: Path) -> Segmenter:
    model, info = load_model(checkpoint)
    return Segmenter(model, info, device=torch.device("cpu"), precision=FP32_NCHW)


def int8_segmenter(checkpoint: Path, size: int) -> Segmenter:
    from segcli.quantize import quantize_onnx

    fp32 = cached_onnx(checkpoint, "onnxruntime")
    quantized = checkpoint.with_name("best.int8.onnx")
    calibration = photo_batch(9, size)[1:]  # not the timed image
    inputs = (image[None].numpy() for image in calibration)
    quantize_onnx(fp32, quantized, inputs, checkpoint.parent, INPUT_NAME)
    model, info = load_onnx(quantized)
    return Segmenter(model, info, device=torch.device("cpu"), precision=FP32_NCHW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_out/runtimes.json"))
    args = parser.parse_args()
    images = photo_batch(args.batch_size, args.size)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_checkpoint(Path(folder), args.size)
        reference = deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False
        ).eval()
        variants = {"torchvision eager fp32 (reference)": lambda: reference(images)["out"]}
        segmenters = {
            # --amp off keeps channels_last on CPU, like auto's fp32: this row is plain NCHW.
            "segcli torch fp32 NCHW": nchw_segmenter(checkpoint),
            "segcli torch (--amp auto)": Segmenter.load(checkpoint, device="cpu"),
        }
        for runtime in ("onnxruntime", "openvino"):
            if installed(runtime):
                segmenters[f"segcli {runtime}"] = Segmenter.load(
                    checkpoint, device="cpu", runtime=runtime
                )
        if installed("onnxruntime"):
            segmenters["segcli onnxruntime int8"] = int8_segmenter(checkpoint, args.size)
        default = Segmenter.load(checkpoint, device="cpu", runtime="auto")
        segmenters[f"default: {default.runtime.name} {default.precision.name}"] = default
        for name, segmenter in segmenters.items():
            variants[name] = lambda segmenter=segmenter: segmenter.logits(images)
        with torch.inference_mode():
            truth = segmenters["segcli torch fp32 NCHW"].logits(images).argmax(1)
            agreement = {
                name: float((s.logits(images).argmax(1) == truth).float().mean())
                for name, s in segmenters.items()
            }
            best = dict.fromkeys(variants, float("inf"))
            for run in variants.values():
                run()  # warm-up: allocation and kernel selection
            for _ in range(args.repeats):
                for name, run in variants.items():
                    started = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - started)
    reference_seconds = best["torchvision eager fp32 (reference)"]
    rows = []
    for name, seconds in best.items():
        row = {
            "variant": name,
            "images_per_s": args.batch_size / seconds,
            "vs_reference": reference_seconds / seconds,
            "agreement": agreement.get(name),
        }
        rows.append(row)
        shown = "" if row["agreement"] is None else f", agreement {row['agreement']:.4%}"
        print(f"{name}: {row['images_per_s']:.2f} images/s, {row['vs_reference']:.2f}x{shown}")
    print(f"default choice: {default.runtime.name} ({default.runtime.reason})")
    report = {
        "host": host_key(),
        "native_bf16": cpu_has_native_bf16(),
        "machine": platform.machine(),
        "size": args.size,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "rows": rows,
        "default_reason": default.runtime.reason,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
