"""One variable at a time: what makes a ResUNet18 learn per epoch and per second on a dataset.

    python benchmarks/ablate_accuracy.py NAME [key=value ...]

Trains for `epochs` epochs with segcli's own dataset, losses, optimizer, schedule and
evaluation (not `seg train`, so a single setting can change while everything else stays), and
prints one JSON line per epoch: train loss, val mIoU, per-class IoU, training and wall seconds.
Settings (defaults in brackets):

    data=DIR [../shared/data/stanford_background]   size=HxW [128x160]   epochs=N [4]
    model=segcli|smp [segcli]      decoder=W,W,W,W[,W] (segcli --decoder-channels) [published]
    up=transpose|bilinear|nearest (segcli --up) [transpose]
    init=he|torch: he is segcli's initialisation, torch re-applies PyTorch's default to the
                   decoder and head (what segcli did before) [he]
    aug=rrc|zoom|none|smp [rrc]: rrc is segcli's augmentation before the accuracy work
                   (random resized crop of area 0.5-1, hflip, rotation 10, colour jitter
                   0.2); zoom is today's default (hflip, scale 0.75-1.25 and a crop); smp is
                   the smp loop's own code for the same recipe
    loss=SPEC [ce]   lr=F [1e-3]   wd=F [1e-4]   bs=N [8]   seed=N [0]
    zir=1|0: segcli zeroes the last BatchNorm's scale in every residual block of the encoder
             (Goyal et al. 2017), so each block starts as the identity; 0 sets it back to
             torchvision's 1 (what segcli did before) [1]
    warmup=EPOCHS: linear warm-up of the cosine [0]
    sched=cosine|poly, power=F: the decay to 0 (`--scheduler`); poly with power 1 is the
             linear decay that Li et al. 2020 (Budgeted Training) found best under a fixed
             budget [cosine, 0.9]
    beta2=F: AdamW's second-moment decay; 0.99 forgets old gradient scales within about 100
             steps instead of 1000 (an 8-epoch run at 128x160 has 568) [0.999]
    sampling=uniform|rare: rare draws training images with replacement, each weighted by
             max(1, sqrt(0.3 / f)) of the rarest class it holds, f being the fraction of
             training images holding that class (repeat-factor sampling, Gupta et al. 2019);
             an epoch keeps its number of batches [uniform]
    crop=F, crop_epochs=N: progressive crops: the first N epochs train on random crops of F
             times the size (same object scale: the zoom still resizes to the full size),
             so each costs about F squared of an epoch; the schedule spans all epochs [1, 0]
    weights=auto|sqrt|W,W,...: class weights for a `wce` loss term: median frequency over
             the train split (`--class-weights auto`), its square root, or given [none]
    deep=1|0: segcli's `--deep-supervision`: 1x1 side heads at 1/8 and 1/4, each adding
             the model's `aux_weight` (0.2) times its loss on logits upsampled to the mask [0]
    attention=none|cbam|self: segcli's `--attention` after each decoder block [none]
    attention_at=I,I,...: keep the attention on these decoder blocks only (0 the deepest) [all]
    head=F: scales the classifier's initial weights (and zeroes its bias), so the first
             logits are F times as large [1]
    opt=adamw|sgd|adam|rmsprop: the optimizer (`--optimizer`; sgd with Nesterov momentum
             0.9) [adamw]
    stop=N: stop after N epochs of a schedule planned for `epochs` (the early epochs of a long
             run, at a fraction of its cost) [0: run them all]
    ema=F: also score an EMA of the weights with this decay (segcli's `--ema`), reported as
             miou_ema; training is unchanged [0: off]
    recal=N: also score a copy whose BatchNorm running statistics are recomputed over N
             training batches (precise BN), reported as miou_recal: tells a lag of the
             running statistics (momentum 0.1) behind fast-moving weights from a real drop [0]

Run one at a time on an idle machine; compare lines of the same run length, not absolute
seconds across machines. smp (segmentation-models-pytorch) is needed only for model=smp.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time

import torch
from torch.optim.swa_utils import update_bn
from torchvision import tv_tensors
from torchvision.transforms import v2

from segcli.checkpoint import CheckpointInfo
from segcli.data import (
    AugmentConfig,
    SegmentationDataset,
    build_loader,
    check_dataset,
    default_normalization,
)
from segcli.device import Precision
from segcli.infer.evaluate import evaluate
from segcli.infer.segmenter import Segmenter
from segcli.losses import build_loss, median_frequency_weights
from segcli.models import build_model
from segcli.train.ema import build_ema
from segcli.train.optim import build_optimizer, build_scheduler
from segcli.train.trainer import compute_loss

DEFAULTS = {
    "data": "../shared/data/stanford_background",
    "size": "128x160",
    "epochs": 4,
    "model": "segcli",
    "decoder": "",
    "up": "transpose",
    "init": "he",
    "aug": "rrc",
    "loss": "ce",
    "lr": 1e-3,
    "wd": 1e-4,
    "bs": 8,
    "seed": 0,
    "zir": 1,
    "warmup": 0.0,
    "beta2": 0.999,
    "weights": "",
    "sampling": "uniform",
    "sched": "cosine",
    "power": 0.9,
    "crop": 1.0,
    "crop_epochs": 0,
    "deep": 0,
    "opt": "adamw",
    "attention": "none",
    "head": 1.0,
    "attention_at": "",
    "ema": 0.0,
    "stop": 0,
    "recal": 0,
}


class ScaleCropFlip:
    """hflip + random scale 0.75-1.25 of the training size + a crop back to it (ignored fill)."""

    def __init__(self, size: tuple[int, int], mean, std) -> None:
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        height, width = self.size
        scale = float(torch.empty(()).uniform_(0.75, 1.25))
        scaled = [round(height * scale), round(width * scale)]
        image = v2.functional.resize(image, scaled, antialias=True)
        mask = v2.functional.resize(mask, scaled, interpolation=v2.InterpolationMode.NEAREST)
        pad = [0, 0, max(0, width - scaled[1]), max(0, height - scaled[0])]
        image = v2.functional.pad(image, pad, fill=0)
        mask = v2.functional.pad(mask, pad, fill=255)
        top = int(torch.randint(0, image.shape[-2] - height + 1, ()))
        left = int(torch.randint(0, image.shape[-1] - width + 1, ()))
        image = image[..., top : top + height, left : left + width]
        mask = mask[..., top : top + height, left : left + width]
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        image = v2.functional.normalize(image.float() / 255, self.mean, self.std)
        return tv_tensors.Image(image), tv_tensors.Mask(mask)


def settings(argv: list[str]) -> tuple[str, dict]:
    if not argv:
        sys.exit(__doc__)
    chosen = dict(DEFAULTS)
    for pair in argv[1:]:
        key, _, value = pair.partition("=")
        if key not in DEFAULTS:
            sys.exit(f"unknown setting {key}; known: {', '.join(DEFAULTS)}")
        chosen[key] = type(DEFAULTS[key])(value)
    return argv[0], chosen


def build(opts: dict, classes: int) -> torch.nn.Module:
    if opts["model"] == "smp":
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None, classes=classes)
    extra = {"decoder_channels": opts["decoder"]} if opts["decoder"] else {}
    extra["up"] = opts["up"]
    extra["attention"] = opts["attention"]
    extra["deep_supervision"] = bool(opts["deep"])
    model = build_model("unet", "resnet18", 3, classes, **extra)
    if not opts["zir"]:
        # The encoder is a feature-extraction graph: its blocks are plain Modules, found by
        # the BatchNorm that closes each residual branch (bn3 in bottlenecks, else bn2).
        for block in model.encoder.modules():
            last = getattr(block, "bn3", None) or getattr(block, "bn2", None)
            if isinstance(last, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(last.weight)
    if opts["attention_at"]:
        kept = {int(i) for i in opts["attention_at"].split(",")}
        for index, block in enumerate(model.decoder):
            if index not in kept:
                block.attention = torch.nn.Identity()
    if opts["head"] != 1.0:
        with torch.no_grad():
            model.head.classify.weight.mul_(opts["head"])
            if model.head.classify.bias is not None:
                model.head.classify.bias.zero_()
    if opts["init"] == "torch":
        for layer in [*model.decoder.modules(), *model.head.modules()]:
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                layer.reset_parameters()
    return model


def class_weights(choice: str, train_pixels: list[int]) -> list[float] | None:
    if not choice:
        return None
    if choice in ("auto", "sqrt"):
        weights = median_frequency_weights(train_pixels)
        return weights if choice == "auto" else [w**0.5 for w in weights]
    return [float(w) for w in choice.split(",")]


def repeat_factor_sampler(
    dataset: SegmentationDataset, classes: int, seed: int
) -> torch.utils.data.WeightedRandomSampler:
    holds = torch.zeros(len(dataset), classes, dtype=torch.bool)
    for index in range(len(dataset)):
        labels = dataset[index][1].unique()
        holds[index, labels[labels < classes]] = True
    image_fraction = holds.float().mean(0).clamp_min(1e-12)
    repeat = (0.3 / image_fraction).sqrt().clamp_min(1.0)
    weights = (holds.float() * repeat).amax(1).clamp_min(1.0)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, len(dataset), generator=generator)


def main() -> None:
    name, opts = settings(sys.argv[1:])
    torch.manual_seed(opts["seed"])
    height, width = (int(v) for v in opts["size"].split("x"))
    report = check_dataset(opts["data"])
    mean, std = default_normalization(3)
    augment = {
        "rrc": AugmentConfig(scale=(0.5, 1.0), rotate=10.0, color_jitter=0.2),
        "zoom": AugmentConfig(),
        "none": None,
        "smp": None,
    }[opts["aug"]]
    common = {"size": (height, width), "mean": mean, "std": std}
    train = SegmentationDataset(report.info, "train", augment=augment, **common)
    if opts["aug"] == "smp":
        train.transform = ScaleCropFlip((height, width), mean, std)
    small_crops = None
    if opts["crop_epochs"] and opts["aug"] == "zoom":
        crop = (round(height * opts["crop"]), round(width * opts["crop"]))
        small_crops = copy.copy(train)
        small_crops.transform = v2.Compose(
            [
                v2.RandomCrop(crop, pad_if_needed=True, fill=step.fill)
                if isinstance(step, v2.RandomCrop)
                else step
                for step in train.transform.transforms
            ]
        )
    elif opts["crop_epochs"]:
        sys.exit("crop_epochs needs aug=zoom")
    val = SegmentationDataset(report.info, "val", **common)
    classes = report.mapping.num_classes
    model = build(opts, classes).to(memory_format=torch.channels_last)
    aux_weight = getattr(model, "aux_weight", 0.0)  # smp's Unet has no side outputs
    sampler = None
    if opts["sampling"] == "rare":
        unaugmented = SegmentationDataset(report.info, "train", **common)
        sampler = repeat_factor_sampler(unaugmented, classes, opts["seed"])
    loader = build_loader(
        train, opts["bs"], True, 0, opts["seed"], "cpu", drop_last=True, sampler=sampler
    )
    small_loader = small_crops and build_loader(
        small_crops, opts["bs"], True, 0, opts["seed"], "cpu", drop_last=True
    )
    val_loader = build_loader(val, 16, False, 0, 0, "cpu")
    # Unaugmented and unshuffled, so that recalibrating draws nothing from the RNGs training uses.
    recal_loader = opts["recal"] and build_loader(
        SegmentationDataset(report.info, "train", **common), opts["bs"], False, 0, 0, "cpu"
    )
    criterion = build_loss(
        opts["loss"],
        num_classes=classes,
        ignore_index=255,
        class_weights=class_weights(opts["weights"], report.splits["train"].class_pixels),
    )
    optimizer = build_optimizer(
        model, opts["opt"], lr=opts["lr"], weight_decay=opts["wd"], nesterov=opts["opt"] == "sgd"
    )
    if opts["opt"] in ("adam", "adamw"):
        for group in optimizer.param_groups:
            group["betas"] = (0.9, opts["beta2"])
    schedule = build_scheduler(
        optimizer,
        opts["sched"],
        epochs=opts["epochs"],
        power=opts["power"],
        steps_per_epoch=len(loader),
        warmup_epochs=opts["warmup"],
    )
    cpu = torch.device("cpu")
    info = CheckpointInfo(
        model={"arch": "unet", "in_channels": 3, "classes": classes},
        classes=report.mapping.to_dict(),
        input_size=(height, width),
        mean=mean,
        std=std,
    )
    ema = build_ema(model, opts["ema"]) if opts["ema"] else None

    def score(scored: torch.nn.Module) -> dict:
        return evaluate(
            Segmenter(scored, info, device=cpu, precision=Precision(None, channels_last=True)),
            val_loader,
            scored_classes=classes,
            ignore_index=255,
        ).metrics

    started, train_seconds = time.perf_counter(), 0.0
    for epoch in range(opts["stop"] or opts["epochs"]):
        model.train()
        total = seen = 0
        epoch_started = time.perf_counter()
        for images, masks in small_loader if epoch < opts["crop_epochs"] else loader:
            output = model(images.contiguous(memory_format=torch.channels_last))
            loss = compute_loss(output, masks, criterion, aux_weight, 255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step_iteration()
            if ema is not None:
                ema.update_parameters(model)
            total += loss.item() * len(images)
            seen += len(images)
        train_seconds += time.perf_counter() - epoch_started
        metrics = score(model)
        iou = [None if v is None else round(v, 3) for v in metrics["iou"]]
        record = {
            "name": name,
            "epoch": epoch + 1,
            "train_loss": round(total / seen, 4),
            "miou": round(metrics["miou"], 4),
            "iou": iou,
            "train_s": round(train_seconds, 1),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        if ema is not None:
            record["miou_ema"] = round(score(ema.module)["miou"], 4)
        if opts["recal"]:
            # update_bn: the statistics become the plain mean over these batches.
            recalibrated = copy.deepcopy(model)
            update_bn(itertools.islice(recal_loader, opts["recal"]), recalibrated)
            record["miou_recal"] = round(score(recalibrated)["miou"], 4)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
