"""Accuracy per CPU-minute: `seg train unet --backbone resnet18` against a bare
segmentation_models_pytorch loop on the same data, host and wall-clock budget.

    pip install segmentation-models-pytorch      # benchmark-only; never a segcli dependency
    python benchmarks/bench_accuracy.py --data ../shared/data/stanford_background --minutes 30

The two run one after the other (never together: each wants every core). Both get the
budget and nothing else about the data:

- segcli: `seg train unet --backbone resnet18 --data DATA --size SIZE --time-limit MINUTES`
  (every other flag at its default; `--segcli-args` adds more), as a subprocess, exactly as a
  user runs it. Its curve is read from the run's metrics.jsonl (`wall_seconds` of each epoch).
- smp: `smp.Unet("resnet18", encoder_weights=None)`, the loop the issue describes: AdamW lr 1e-3,
  weight decay 1e-2, cosine over the budget (by elapsed time), CE + 0.5 soft Dice (smp's
  DiceLoss, ignore 255), hflip + random scale 0.75-1.25 + crop (padding ignored), batch 8,
  fp32 in channels_last, data in the main process, validated after every epoch.

Both stop when the next epoch would overrun the budget and are scored alike: val images
resized (antialiased bilinear) to SIZE, masks resized nearest, one confusion matrix over the split,
mIoU over classes present in target or prediction. The report gives the best val mIoU each had
reached at every 10 minutes, writes `accuracy.json` and `accuracy.png` (both curves against
minutes) to `--out`. Run it on an otherwise idle machine and name the CPU beside its figures.
Cloud hosts drift (in one run the same epoch's training took 252 s, and 175 s fifteen minutes
later), so before and after each side a probe times the same fixed work, training steps of
smp's Unet at the benchmark's size and batch: sides with unequal probes ran on unequal hosts,
and the report (`host_probe_s_per_step`) says so.

`--interleave SECONDS` removes the drift from the comparison instead: both sides run at once
as two processes that take turns on the whole machine (SIGSTOP / SIGCONT), SECONDS each, so
any minute of host drift falls on both alike. Each is given twice the budget in wall-clock (it
runs half the time; segcli's `--time-limit` planner and smp's cosine both see that clock) and
its points are put back on its own clock: the seconds it ran between its first training step
and each epoch's end (metrics.jsonl's `ended_at` for segcli).

`--throughput` instead times training steps (images/s) of segcli's default ResUNet18 (`fast`
decoder with CBAM), the same without attention, the published decoder, the
`--decoder-channels 256,128,64,32` form and smp's Unet, round-robin in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from segcli.device import onednn_isa_cap

IGNORE = 255
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def cpu_name() -> str:
    """The CPU model and its widest vector ISA (native bf16, AVX-512, AVX2), for the report."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    flags = set(info.split())
    # The hardware from its flags; a kernel cap (which `--amp auto` honours) is named after it.
    if {"avx512_bf16", "amx_bf16"} & flags:
        kind = "AVX512-BF16"
    elif "avx512f" in flags:
        kind = "AVX-512 without bf16"
    else:
        kind = "AVX2 only" if "avx2" in flags else "no AVX2"
    # The same reading of the oneDNN cap as `--amp auto`'s, older DNNL_ name included.
    onednn_cap = onednn_isa_cap()
    caps = [f"oneDNN <= {onednn_cap}"] if onednn_cap else []
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        caps.append(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}")
    capped = f" (kernels capped: {', '.join(caps)})" if caps else ""
    return f"{model}, {os.cpu_count()} cores, {kind}{capped}"


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


# -- the bare smp loop ------------------------------------------------------------------------
def pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    masks = {p.stem: p for p in (root / split / "masks").iterdir()}
    images = sorted(
        p for p in (root / split / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    return [(image, masks[image.stem]) for image in images if image.stem in masks]


def load_pair(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path))
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int64))


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    image = F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def normalise(image: torch.Tensor) -> torch.Tensor:
    return (image / 255 - MEAN) / STD


def train_sample(image, mask, size, generator):
    """hflip + random scale 0.75-1.25 of the training size + a random crop of it."""
    scale = 0.75 + 0.5 * torch.rand((), generator=generator).item()
    scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    image, mask = resize_pair(image, mask, scaled)
    pad_h, pad_w = max(0, size[0] - scaled[0]), max(0, size[1] - scaled[1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
    top = int(torch.randint(0, image.shape[1] - size[0] + 1, (), generator=generator))
    left = int(torch.randint(0, image.shape[2] - size[1] + 1, (), generator=generator))
    image = image[:, top : top + size[0], left : left + size[1]]
    mask = mask[top : top + size[0], left : left + size[1]]
    if torch.rand((), generator=generator).item() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return normalise(image), mask


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    valid = target != IGNORE
    index = target[valid] * classes + pred[valid]
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def mean_iou(matrix: torch.Tensor) -> float:
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean())


def validate(model, val_set, classes: int, batch: int) -> float:
    model.eval()
    matrix = torch.zeros(classes, classes, dtype=torch.int64)
    with torch.inference_mode():
        for start in range(0, len(val_set), batch):
            chunk = val_set[start : start + batch]
            images = torch.stack([image for image, _ in chunk]).contiguous(
                memory_format=torch.channels_last
            )
            masks = torch.stack([mask for _, mask in chunk])
            matrix += confusion(model(images).argmax(1), masks, classes)
    model.train()
    return mean_iou(matrix)


def run_smp(args: argparse.Namespace, classes: int) -> list[dict]:
    import segmentation_models_pytorch as smp

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    size = parse_size(args.size)
    train_pairs = pairs(args.data, "train")
    val_set = [
        tuple(map(lambda t: t, resize_pair(*load_pair(*p), size))) for p in pairs(args.data, "val")
    ]
    val_set = [(normalise(image), mask) for image, mask in val_set]
    model = smp.Unet("resnet18", encoder_weights=None, classes=classes)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)
    budget = args.minutes * 60
    started = time.perf_counter()
    curve: list[dict] = []
    epoch_seconds: list[float] = []
    epoch = 0
    while True:
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_pairs), generator=generator).tolist()
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            samples = [
                train_sample(*load_pair(*train_pairs[i]), size, generator)
                for i in order[start : start + args.batch_size]
            ]
            images = torch.stack([s[0] for s in samples]).contiguous(
                memory_format=torch.channels_last
            )
            masks = torch.stack([s[1] for s in samples])
            progress = min(1.0, (time.perf_counter() - started) / budget)
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * progress))
            logits = model(images)
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE) + 0.5 * dice(logits, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch += 1
        miou = validate(model, val_set, classes, args.batch_size)
        elapsed = time.perf_counter() - started
        epoch_seconds.append(time.perf_counter() - epoch_start)
        curve.append(
            {"epoch": epoch, "minutes": elapsed / 60, "miou": miou, "ended_at": time.time()}
        )
        print_curve("smp", curve[-1:])
        if elapsed + epoch_seconds[-1] > budget:
            return curve


def synthetic_batch(args: argparse.Namespace, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images (channels_last) and masks at the benchmark's size and batch."""
    generator = torch.Generator().manual_seed(0)
    size = parse_size(args.size)
    images = torch.randn(args.batch_size, 3, *size, generator=generator)
    masks = torch.randint(0, classes, (args.batch_size, *size), generator=generator)
    return images.contiguous(memory_format=torch.channels_last), masks


def training_step(model, optimizer, images, masks, dtype: torch.dtype | None = None) -> None:
    """One forward, cross-entropy, backward and optimizer step (autocast to `dtype` if given)."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(images).float(), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def host_probe(args: argparse.Namespace, classes: int) -> float:
    """Seconds per training step of a fixed model (smp's Unet-ResNet18, AdamW, fp32
    channels_last, seeded inputs), best of three after a warm-up: the host's speed now."""
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=classes)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, masks = synthetic_batch(args, classes)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        training_step(model, optimizer, images, masks)
        times.append(time.perf_counter() - started)
    return min(times[1:])


# -- segcli, as a user runs it ----------------------------------------------------------------
def segcli_command(args: argparse.Namespace, minutes: float) -> tuple[list[str], Path]:
    """The `seg train` command line with a `minutes` budget, and its (emptied) run folder."""
    out = args.out / "segcli-run"
    if out.exists():
        for path in out.iterdir():
            path.unlink()
    command = [
        sys.executable,
        "-m",
        "segcli",
        "train",
        "unet",
        "--backbone",
        "resnet18",
        "--data",
        str(args.data),
        "--size",
        args.size,
        "--time-limit",
        str(minutes),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        *shlex.split(args.segcli_args),
    ]
    print("segcli:", " ".join(command[2:]), flush=True)
    return command, out


def segcli_curve(out: Path) -> list[dict]:
    """segcli's points from its run's metrics.jsonl: minutes since its first training step
    (`wall_seconds`) and the Unix time each epoch ended."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "epoch": r["epoch"],
            "minutes": r["wall_seconds"] / 60,
            "miou": r["val"]["miou"],
            "ended_at": r["ended_at"],
        }
        for r in records
    ]


def print_curve(name: str, curve: list[dict]) -> None:
    for point in curve:
        print(
            f"{name:<6} epoch {point['epoch']}: {point['minutes']:5.1f} min, "
            f"val mIoU {point['miou']:.4f}",
            flush=True,
        )


def run_segcli(args: argparse.Namespace) -> list[dict]:
    command, out = segcli_command(args, args.minutes)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    curve = segcli_curve(out)
    print_curve("segcli", curve)
    return curve


# -- both sides interleaved --------------------------------------------------------------------
def active_seconds(slices: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] (Unix times) that fall inside one side's running slices."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in slices)


def run_interleaved(args: argparse.Namespace) -> dict[str, list[dict]]:
    """segcli and smp as two processes that take turns on the whole machine, `--interleave`
    seconds each (SIGSTOP / SIGCONT), so every minute of host drift falls on both alike. Each
    side is given twice the budget in wall-clock, which its planner and cosine see, and its
    points are put back on its own clock: the seconds it ran between its first training step
    and each epoch's end."""
    import signal

    wall_minutes = 2 * args.minutes
    smp_curve_path = args.out / "smp-curve.json"
    smp_curve_path.unlink(missing_ok=True)
    segcli_cmd, segcli_out = segcli_command(args, wall_minutes)
    smp_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--data", str(args.data), "--minutes", str(wall_minutes), "--size", args.size),
        *("--batch-size", str(args.batch_size), "--seed", str(args.seed)),
        *("--out", str(args.out), "--smp-curve", str(smp_curve_path)),
    ]
    children = {
        name: subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        for name, command in (("segcli", segcli_cmd), ("smp", smp_cmd))
    }
    for child in children.values():
        os.killpg(child.pid, signal.SIGSTOP)
    slices: dict[str, list[tuple[float, float]]] = {name: [] for name in children}
    try:
        while any(child.poll() is None for child in children.values()):
            for name, child in children.items():
                if child.poll() is not None:
                    if child.returncode != 0:
                        raise SystemExit(f"{name} failed (exit {child.returncode})")
                    # A finished side's turn stays idle: the other keeps running half the time,
                    # as its planner and cosine (on the doubled budget) expect.
                    if any(c.poll() is None for c in children.values()):
                        time.sleep(args.interleave)
                    continue
                os.killpg(child.pid, signal.SIGCONT)
                started = time.time()
                try:
                    child.wait(timeout=args.interleave)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGSTOP)
                slices[name].append((started, time.time()))
    finally:
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    for name, child in children.items():
        if child.returncode != 0:
            raise SystemExit(f"{name} failed (exit {child.returncode})")
    curves = {
        "segcli": segcli_curve(segcli_out),
        "smp": json.loads(smp_curve_path.read_text()),
    }
    for name, curve in curves.items():
        for point in curve:
            first_step = point["ended_at"] - point["minutes"] * 60
            point["wall_minutes"] = point["minutes"]
            point["minutes"] = active_seconds(slices[name], first_step, point["ended_at"]) / 60
        print_curve(name, curve)
    return curves


def throughput(args: argparse.Namespace, classes: int) -> dict[str, float]:
    """Training images/s of one forward + backward + AdamW step, batch `--batch-size`, fp32
    channels_last (and bf16 autocast where the CPU has it natively), for segcli's default
    ResUNet18 (fast decoder with CBAM), the same without attention, the published decoder, the
    `--decoder-channels 256,128,64,32` form and smp's Unet; timed
    round-robin, best of `--repeats`, so load from other processes hurts all alike."""
    import segmentation_models_pytorch as smp

    from segcli.device import cpu_has_native_bf16
    from segcli.models import build_model
    from segcli.train.optim import build_optimizer

    models = {
        "segcli default (fast decoder, CBAM)": build_model("unet", "resnet18", 3, classes),
        "segcli fast decoder without attention": build_model(
            "unet", "resnet18", 3, classes, attention="none"
        ),
        "segcli published decoder": build_model(
            "unet", "resnet18", 3, classes, decoder_channels="published"
        ),
        "segcli --decoder-channels 256,128,64,32": build_model(
            "unet", "resnet18", 3, classes, decoder_channels="256,128,64,32"
        ),
        "smp Unet": smp.Unet("resnet18", encoder_weights=None, classes=classes),
    }
    images, masks = synthetic_batch(args, classes)
    dtypes = [None, torch.bfloat16] if cpu_has_native_bf16() else [None]
    steps = {}
    for name, model in models.items():
        model = model.to(memory_format=torch.channels_last).train()
        optimizer = build_optimizer(model, "adamw", lr=1e-4)
        for dtype in dtypes:

            def step(model=model, optimizer=optimizer, dtype=dtype) -> None:
                training_step(model, optimizer, images, masks, dtype)

            step()
            steps[f"{name}, {'bf16' if dtype else 'fp32'} channels_last"] = step
    best = dict.fromkeys(steps, 0.0)
    for _ in range(args.repeats):
        for key, step in steps.items():
            started = time.perf_counter()
            step()
            best[key] = max(best[key], args.batch_size / (time.perf_counter() - started))
    for key, rate in best.items():
        print(f"{key}: {rate:.2f} training images/s", flush=True)
    return best


def best_by(curve: list[dict], minutes: float) -> float | None:
    reached = [p["miou"] for p in curve if p["minutes"] <= minutes + 1e-9]
    return max(reached) if reached else None


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    width, height, margin = 760, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    minutes = max(p["minutes"] for c in curves.values() for p in c)
    values = [p["miou"] for c in curves.values() for p in c]
    low, high = math.floor(min(values) * 20) / 20, math.ceil(max(values) * 20) / 20
    box = (margin, 40, width - 20, height - margin)
    draw.rectangle(box, outline=(0, 0, 0))
    draw.multiline_text((margin, 6), title, fill=(0, 0, 0))

    def xy(m: float, v: float) -> tuple[float, float]:
        x = box[0] + (box[2] - box[0]) * m / minutes
        return x, box[3] - (box[3] - box[1]) * (v - low) / max(high - low, 1e-9)

    for tick in range(0, int(minutes) + 1, 5):
        x, _ = xy(tick, low)
        draw.line((x, box[3], x, box[3] + 4), fill=(0, 0, 0))
        draw.text((x - 6, box[3] + 8), str(tick), fill=(0, 0, 0))
    draw.text(((box[0] + box[2]) // 2 - 20, height - 24), "minutes", fill=(0, 0, 0))
    steps = round((high - low) / 0.05)
    for i in range(steps + 1):
        value = low + i * 0.05
        _, y = xy(0, value)
        draw.text((8, y - 6), f"{value:.2f}", fill=(0, 0, 0))
    colours = {"segcli": (214, 39, 40), "smp": (31, 119, 180)}
    for index, (name, curve) in enumerate(curves.items()):
        points = [xy(p["minutes"], p["miou"]) for p in curve]
        colour = colours.get(name, (44, 160, 44))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((box[0] + 10 + 110 * index, box[1] + 8), f"{name} val mIoU", fill=colour)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/stanford_background"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--size", default="256")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="smp loop batch (segcli: default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/accuracy"))
    parser.add_argument("--only", choices=("segcli", "smp"))
    parser.add_argument("--segcli-args", default="", help="extra seg train flags, quoted")
    parser.add_argument(
        "--throughput", action="store_true", help="only time training steps of the three models"
    )
    parser.add_argument("--repeats", type=int, default=5, help="--throughput rounds")
    parser.add_argument(
        "--interleave",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run both at once, taking turns of SECONDS on the machine (0: one after the other)",
    )
    parser.add_argument("--smp-curve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave < 0 or (args.interleave and args.only):
        parser.error("--interleave takes a positive number of seconds and runs both sides")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    from segcli.data import check_dataset

    classes = check_dataset(args.data).mapping.num_classes
    if args.smp_curve:  # one side of --interleave
        args.smp_curve.write_text(json.dumps(run_smp(args, classes)))
        return
    if args.throughput:
        rates = throughput(args, classes)
        (args.out / "throughput.json").write_text(
            json.dumps({"cpu": cpu_name(), "size": args.size, "images_per_s": rates}, indent=2)
        )
        return
    report_path = args.out / "accuracy.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(
        {
            "cpu": cpu_name(),
            "data": str(args.data),
            "minutes": args.minutes,
            "size": args.size,
            "torch": torch.__version__,
        }
    )
    curves = report.setdefault("curves", {})
    probes = report.setdefault("host_probe_s_per_step", {})
    if args.interleave:
        before = host_probe(args, classes)
        curves.update(run_interleaved(args))
        probes["both, interleaved"] = {"before": before, "after": host_probe(args, classes)}
        report["interleave_s"] = args.interleave
    runners = {"segcli": lambda: run_segcli(args), "smp": lambda: run_smp(args, classes)}
    for name, run in runners.items():
        if not args.interleave and args.only in (None, name):
            before = host_probe(args, classes)
            curves[name] = run()
            probes[name] = {"before": before, "after": host_probe(args, classes)}
    marks = list(range(10, int(args.minutes) + 1, 10)) or [args.minutes]
    report["best_by_minute"] = {
        str(m): {name: best_by(curve, m) for name, curve in curves.items()} for m in marks
    }
    report_path.write_text(json.dumps(report, indent=2))
    if len(curves) == 2:
        clock = (
            f"minutes each ran, interleaved in {args.interleave:g} s turns"
            if args.interleave
            else "wall-clock"
        )
        title = f"{args.data.name}, {args.size}: val mIoU vs {clock}\n{report['cpu']}"
        plot(curves, args.out / "accuracy.png", title)
    print(f"\n{report['cpu']}; {args.data.name} at {args.size}; budget {args.minutes:g} min")
    for name, probe in probes.items():
        print(
            f"host probe around {name}: {probe['before']:.2f} s per step before, "
            f"{probe['after']:.2f} s after (same work each time)"
        )
    print("minutes  " + "  ".join(f"{name:>8}" for name in curves))
    for m, row in report["best_by_minute"].items():
        cells = ["   n/a  " if v is None else f"{v:8.4f}" for v in row.values()]
        print(f"{m:>7}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
