"""The training loop behind `seg train`: mixed precision, channels_last, torch.compile,
gradient accumulation and clipping, auxiliary losses, DDP, atomic checkpoints, resume, early
stopping, and clean stops on Ctrl-C, SIGTERM or a non-finite loss."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import random
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcli.checkpoint import (
    CheckpointInfo,
    model_build_config,
    model_options,
    read_checkpoint,
    save_checkpoint,
)
from segcli.device import (
    Precision,
    compiled,
    data_workers,
    inference_mode,
    resolve_device,
    resolve_precision,
    to_device,
)
from segcli.errors import RuntimeFailure, SegError, UsageError
from segcli.files import atomic_link, atomic_write_bytes
from segcli.infer.evaluate import evaluate
from segcli.infer.segmenter import Segmenter
from segcli.infer.spec import InferenceSpec
from segcli.train.config import TrainConfig
from segcli.train.distributed import (
    DistContext,
    ShardSampler,
    init_distributed,
    shutdown_distributed,
)
from segcli.train.ema import build_ema
from segcli.train.optim import load_optimizer_state
from segcli.train.report import append_jsonl, plot_curves, read_jsonl, save_preview
from segcli.train.state import (
    check_pair,
    load_training_state,
    save_training_state,
    state_path_for,
)
from segcli.train.trackers import Trackers, tracker_names

# RUN/status.json: how the run's last session ended (`seg runs` reads it).
STATUS_FILE = "status.json"
# `--time-limit` plans at the mean cost of this many most recent epochs.
PLANNING_EPOCHS = 2
# Before any epoch has ended, `--time-limit` plans once from the steps of the first tenth of the
# first epoch (after its first step, which carries one-off set-up): a budget that fits one or two
# epochs would otherwise spend the first at the peak of a cosine planned over `--epochs`.
FIRST_PLAN_SHARE = 0.1
# A validation batch is a forward pass, about a third of a training step (forward and backward);
# 0.28 measured on an AVX2 EPYC (benchmarks/profile_epoch.py). Only the first plan estimates it.
VALIDATION_STEP_SHARE = 1 / 3


class TrainingInterrupted(SegError):
    """Ctrl-C or SIGTERM: the last finished epoch is saved; exit 130 like a shell."""

    exit_code = 130


@dataclass
class RunData:
    """Datasets and what the model and loss need to know about them."""

    train: Any
    val: Any
    mapping: Any
    class_pixels: list[int]
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Native-resolution patches (--crop): the factor images are resized by; None: whole images
    # resized to `size`.
    patch_scale: float | None = None
    split: Any = None  # the SplitPlan: which images train and which validate
    root: Path | None = None

    @property
    def model_classes(self) -> int:
        """Binary datasets train a one-logit (sigmoid) model; others one logit per class."""
        return 1 if self.mapping.kind == "binary" else self.mapping.num_classes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(config: TrainConfig, backbone: str) -> Path:
    """runs/<arch>-<backbone>, numbered -2, -3... when taken, so no run overwrites another."""
    base = Path("runs") / f"{config.arch}-{backbone}"
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


# Files only a run that trained leaves: their presence means the folder holds a run.
RUN_RECORDS = ("best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.jsonl")
# What a run writes into its folder; `overwrite` removes these and nothing else.
RUN_OUTPUTS = (*RUN_RECORDS, "status.json", "config.toml", "split.json", "curves.png")


def claim_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that holds another run (its checkpoints would be replaced
    and its metrics mixed with the new run's), or with `overwrite` clear that run's files."""
    if not any((out / name).is_file() for name in RUN_RECORDS):
        return
    if not overwrite:
        records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
        held = f"a run of {records[-1]['epoch']} epoch(s)" if records else "a run"
        raise UsageError(
            f"{out} holds {held}; continue it with `resume` {out / 'last.safetensors'}, "
            "replace it with `overwrite`, or give another `out`"
        )
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for preview in out.glob("preview_*.png"):
        preview.unlink()
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def check_same_model(config: TrainConfig, info: CheckpointInfo) -> None:
    """A resumed run keeps the model its checkpoint holds: refuse an architecture, backbone,
    input channels or model option given now that differs from it, instead of ignoring it
    while config.toml records it."""
    from segcli.models.registry import resolve_backbone

    built = info.model
    asked: dict[str, Any] = {"arch": config.arch, "in_channels": config.in_channels}
    if config.backbone is not None:
        asked["backbone"] = resolve_backbone(config.arch, config.backbone)
    stored = {**model_options(info), **{key: built[key] for key in asked}}
    asked |= config.model_options
    for key, value in asked.items():
        if key in stored and str(value) != str(stored[key]):
            name = "architecture" if key == "arch" else f"`{key}`"
            raise UsageError(
                f"{name} {value} differs from the resumed run's {stored[key]}: a resumed run "
                f"keeps its model; drop it, or start a new run with `out`"
            )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, bool]]:
    """The first SIGINT/SIGTERM asks the loop to stop at the next step; a second one kills."""
    flag = {"stop": False}
    previous = {}

    def request_stop(signum: int, frame: Any) -> None:
        flag["stop"] = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, request_stop)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_data(config: TrainConfig, out: Path, mapping: Any = None) -> RunData:
    """The run's datasets. `out` is the run folder: annotation formats rasterise into its
    `cache/`, and a resumed run reads the split it started with from its split.json."""
    from segcli.data import (
        AugmentConfig,
        SegmentationDataset,
        check_dataset,
        default_normalization,
        mock_root,
        parse_size,
    )
    from segcli.data.splits import SPLIT_FILE, load_split, plan_split

    root = Path(config.data) if config.data else mock_root()
    report = check_dataset(
        root,
        config.classes_file,
        foreground_value=config.foreground,
        mapping=mapping,
        required_splits=("train",),
        data_format=config.format,
        ignore_values=config.ignore_value_list(),
        reduce_zero_label=config.reduce_zero_label,
        cache=out / "cache",
    )
    saved = out / SPLIT_FILE
    if config.resume and saved.is_file():
        split = load_split(saved, report.root)
    else:
        split = plan_split(
            report.info,
            val_fraction=config.val_fraction,
            seed=config.seed,
            folds=config.folds,
            fold=config.fold,
        )
    info = dataclasses.replace(report.info, splits={"train": split.train, "val": split.val})
    # Class pixels of the split as trained: the dataset's train split, or every split pooled
    # when train was re-cut (hold-out or folds), which is within a fold of the same figure.
    if split.kind == "dataset":
        pixels = report.splits["train"].class_pixels
    else:
        pixels = np.sum([stats.class_pixels for stats in report.splits.values()], axis=0).tolist()
    patches = config.crop is not None
    size = (config.crop, config.crop) if patches else parse_size(config.size)
    if patches:
        check_crop(info, config.crop, config.scale)
    mean, std = default_normalization(config.in_channels)
    augment = AugmentConfig.from_flags(
        config.augment,
        config.scale_min,
        config.hflip,
        config.vflip,
        config.rotate,
        config.color_jitter,
        config.zoom,
    )
    common = {"in_channels": config.in_channels, "mean": mean, "std": std}
    scale = config.scale if patches else None
    # Patch models validate on whole images (sliding windows, scored at the image's own size).
    val_size = None if patches else size
    return RunData(
        train=SegmentationDataset(info, "train", size=size, augment=augment, scale=scale, **common),
        val=SegmentationDataset(
            info, "val", size=val_size, scale=scale, native_masks=patches, **common
        ),
        mapping=report.mapping,
        class_pixels=[int(count) for count in pixels],
        size=size,
        mean=tuple(mean),
        std=tuple(std),
        patch_scale=scale,
        split=split,
        root=report.root,
    )


def check_crop(info: Any, crop: int, scale: float) -> None:
    """Refuse a --crop larger than the smallest training image at --scale (it would train on
    padding), naming that image."""
    from segcli.data import image_sizes

    paths = [image for image, _ in info.pairs("train")]
    found = [
        (min(size), path) for path, size in zip(paths, image_sizes(paths), strict=True) if size
    ]
    if not found:
        return
    side, path = min(found)
    if round(side * scale) < crop:
        largest = round(side * scale)
        raise UsageError(
            f"`crop` {crop} is larger than {path.name} ({side} px on its short side, "
            f"{largest} at `scale` {scale:g}); use `crop` {largest} or less, or a larger `scale`"
        )


def build_criterion(config: TrainConfig, data: RunData, model_classes: int) -> nn.Module:
    from segcli.losses import build_loss, median_frequency_weights

    weights = None
    if config.class_weights == "auto":
        weights = median_frequency_weights(data.class_pixels)
    elif config.class_weights:
        try:
            weights = [float(w) for w in config.class_weights.split(",")]
        except ValueError:
            raise UsageError(
                f"`class_weights` takes numbers like 1,2,5 or 'auto', not '{config.class_weights}'"
            ) from None
    return build_loss(
        config.loss,
        num_classes=model_classes,
        ignore_index=data.mapping.ignore_index,
        class_weights=weights,
        focal_gamma=config.focal_gamma,
        focal_alpha=config.focal_alpha,
        tversky_alpha=config.tversky_alpha,
        tversky_beta=config.tversky_beta,
        dice_include_background=config.dice_background,
    )


def presence_targets(masks: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    """N x classes: 1 where a class occurs in the image (for the UNet 3+ CGM's BCE)."""
    scored = max(classes, 2)
    valid = masks != ignore_index
    onehot = torch.zeros(masks.shape[0], scored, device=masks.device)
    for index in range(masks.shape[0]):
        present = torch.unique(masks[index][valid[index]])
        onehot[index, present] = 1.0
    return onehot[:, 1:] if classes == 1 else onehot


def compute_loss(
    output: torch.Tensor | dict[str, Any],
    masks: torch.Tensor,
    criterion: nn.Module,
    aux_weight: float,
    ignore_index: int,
) -> torch.Tensor:
    """Main loss, plus `aux_weight` x each auxiliary output's loss, plus the CGM's BCE."""
    if isinstance(output, torch.Tensor):
        return criterion(output, masks)
    loss = criterion(output["out"], masks)
    for aux in output.get("aux", []):
        loss = loss + aux_weight * criterion(aux, masks)
    if "cls" in output:
        presence = output["cls"].float()
        target = presence_targets(masks, presence.shape[1], ignore_index)
        loss = loss + F.binary_cross_entropy_with_logits(presence, target)
    return loss


class TrainingEvents(Protocol):
    """What the trainer reports while it runs; the CLI's progress reporter implements it."""

    def log(self, message: str) -> None: ...

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float, lr: float, images_per_second: float) -> None: ...

    def epoch_end(self, record: dict[str, Any], best: bool) -> None: ...

    def close(self) -> None: ...


class SilentEvents:
    """The default: training used as a library reports through metrics.jsonl and its return
    value only."""

    def log(self, message: str) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, lr: float, images_per_second: float) -> None:
        pass

    def epoch_end(self, record: dict[str, Any], best: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, config: TrainConfig, reporter: TrainingEvents | None = None) -> None:
        self.config = config
        self.context: DistContext = init_distributed(config.device)
        # Only rank 0 reports: the other ranks of a DDP run would repeat every line.
        active = reporter is not None and self.context.is_main
        self.reporter: TrainingEvents = reporter if active else SilentEvents()

    # -- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        config, context = self.config, self.context
        if context.enabled and torch.cuda.is_available() and config.device in ("auto", "cuda"):
            self.device = torch.device("cuda", context.local_rank)
        else:
            self.device = resolve_device(config.device)
        self.precision: Precision = resolve_precision(
            config.amp, self.device, config.channels_last, purpose="train"
        )
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(config.seed)

        resume_state = None
        mapping = None
        if config.resume:
            _, info = read_checkpoint(config.resume)
            from segcli.data import ClassMapping

            mapping = ClassMapping.from_dict(info.classes)
            resume_state = load_training_state(state_path_for(config.resume))
            check_pair(Path(config.resume), resume_state, info)
            check_same_model(config, info)
        from segcli.models import build_model
        from segcli.models.registry import resolve_backbone

        if config.resume:
            self.out = Path(config.resume).parent
        elif config.out:
            self.out = Path(config.out)
            if context.is_main:
                claim_run_folder(self.out, config.overwrite)
        else:
            self.out = default_run_dir(config, resolve_backbone(config.arch, config.backbone))
        self.data = load_data(config, self.out, mapping)

        # A resumed run's weights, pretrained ones included, come from its checkpoint: resuming
        # needs neither the network nor the original --backbone-weights file.
        weights: dict[str, Any] = {}
        options = dict(config.model_options)
        if config.resume:
            options.update(model_options(info))
        else:
            weights = {"pretrained": True} if config.pretrained else {}
            if config.backbone_weights:
                weights["backbone_weights"] = config.backbone_weights
        model = build_model(
            config.arch,
            config.backbone,
            config.in_channels,
            self.data.model_classes,
            **options,
            **weights,
        )
        self.backbone = model.build_config["backbone"]
        self.aux_weight = config.aux_weight if config.aux_weight is not None else model.aux_weight
        if config.sync_bn and context.enabled:
            if self.device.type != "cuda":
                raise UsageError(
                    "`sync_bn` needs CUDA devices; PyTorch's SyncBatchNorm has no CPU path"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if self.precision.channels_last else None
        self.model = model.to(self.device, memory_format=memory_format)
        # The averaged copy (on by default, `ema` 0 is off) is what validation scores and
        # checkpoints hold: raw weights at the peak lr score noisily from epoch to epoch.
        self.ema = build_ema(self.model, config.ema) if config.ema else None
        self.criterion = build_criterion(config, self.data, self.data.model_classes)

        from segcli.data import build_loader, native_masks_collate
        from segcli.train.optim import build_optimizer, build_scheduler

        train_sampler = None
        if context.enabled:
            from torch.utils.data import DistributedSampler

            train_sampler = DistributedSampler(
                self.data.train, context.world_size, context.rank, shuffle=True, seed=config.seed
            )
        batch = min(config.batch_size, len(self.data.train))
        self._check_batch(batch, model)
        # Persistent workers carry their RNG across epochs, which a resumed run cannot
        # reproduce; deterministic runs load in the main process, seeded every epoch.
        workers = 0 if config.deterministic else data_workers(config.workers, self.device)
        self.train_loader = build_loader(
            self.data.train,
            batch,
            shuffle=True,
            workers=workers,
            seed=config.seed,
            device_type=self.device.type,
            drop_last=len(self.data.train) > batch,
            sampler=train_sampler,
        )
        patches = self.data.patch_scale is not None
        self.val_loader = build_loader(
            self.data.val,
            # Whole images of different sizes, each slid over by windows.
            1 if patches else config.batch_size,
            collate_fn=native_masks_collate if patches else None,
            shuffle=False,
            workers=workers,
            seed=config.seed,
            device_type=self.device.type,
            sampler=ShardSampler(len(self.data.val), context) if context.enabled else None,
        )
        self.optimizer = build_optimizer(
            self.model,
            config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.accum_steps)
        self.scheduler = build_scheduler(
            self.optimizer,
            config.scheduler,
            epochs=config.epochs,
            steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=config.warmup_epochs,
            step_size=config.step_size,
            gamma=config.gamma,
            power=config.power,
            min_lr=config.min_lr,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)

        self.start_epoch, self.best_miou, self.best_epoch, self.bad_epochs = 0, -1.0, 0, 0
        # Wall-clock of earlier sessions of this run (resume) and the epochs a time limit plans.
        self.wall_before, self.planned_epochs = 0.0, config.epochs
        if config.resume:
            self._restore(resume_state)
        self.step_model: nn.Module = self.model
        if config.compile:
            self.step_model = compiled(self.model)
        if context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = DistributedDataParallel(self.step_model, device_ids=device_ids)

    def _save_split(self) -> None:
        """Write split.json (a resumed run keeps its own) and say how the split was made when
        the dataset's own val split was not used as it is."""
        from segcli.data.splits import SPLIT_FILE, save_split

        split, path = self.data.split, self.out / SPLIT_FILE
        if not path.is_file():
            save_split(split, self.data.root, path)
        if split.kind != "dataset":
            self.reporter.log(f"{split.describe()}; written to {path}")

    def _check_batch(self, batch: int, model: nn.Module) -> None:
        """Refuse, before any work, batches that cannot train: smaller than the model's BatchNorm
        allows, or (DDP) larger than one rank's shard of the training set, which gives no step."""
        config, context = self.config, self.context
        smallest = getattr(model, "min_train_batch", 1)
        if batch < smallest:
            what = f"`batch_size` {config.batch_size}"
            if batch < config.batch_size:
                what = f"the training set's {len(self.data.train)} image(s)"
            raise UsageError(
                f"{what}: {config.arch} trains on batches of at least {smallest} (a BatchNorm "
                f"after global pooling sees one value per image); use `batch_size` {smallest} "
                "or more"
            )
        if context.enabled:
            shard = math.ceil(len(self.data.train) / context.world_size)
            if config.batch_size > shard:
                raise UsageError(
                    f"`batch_size` {config.batch_size} is larger than each rank's shard of "
                    f"{shard} images ({len(self.data.train)} training images over "
                    f"{context.world_size} processes); use `batch_size` {shard} or less"
                )

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and saved: the EMA copy, or the model itself when `ema` is 0."""
        return self.ema.module if self.ema is not None else self.model

    def _restore(self, state: dict[str, Any]) -> None:
        weights, _ = read_checkpoint(self.config.resume)
        # With an EMA the checkpoint holds the averaged weights and the state the raw ones.
        self.model.load_state_dict(state.get("model", weights))
        if self.ema is not None:
            self.ema.module.load_state_dict(weights)
            self.ema.n_averaged.fill_(int(state.get("ema_updates", 0)))
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best_miou = float(state["best_miou"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.wall_before = float(state.get("wall_seconds", 0.0))
        if self.config.time_limit:
            self.planned_epochs = min(
                self.config.epochs, int(state.get("planned_epochs", 0)) or self.config.epochs
            )
        # The saved schedule ends where the interrupted run planned it; a raised or lowered
        # --epochs moves that end from the current lr on.
        self.scheduler.plan_epochs(self.planned_epochs)
        if self.start_epoch >= self.config.epochs:
            raise UsageError(
                f"`resume`: the run already finished {self.start_epoch} epochs; raise `epochs` "
                "to train further"
            )

    def _segmenter(self) -> Segmenter:
        """The live model behind the one inference path, as the checkpoint will describe it."""
        return Segmenter(
            self.eval_model,
            self._info(0, {}),
            device=self.device,
            precision=self.precision,
            window_batch=self.config.batch_size,
        )

    # -- files -------------------------------------------------------------------------------
    def _info(self, epoch: int, metrics: dict[str, Any]) -> CheckpointInfo:
        inference = None
        if self.data.patch_scale is not None:
            inference = InferenceSpec(
                policy="patches",
                size=self.data.size,
                in_channels=self.config.in_channels,
                mean=self.data.mean,
                std=self.data.std,
                activation="sigmoid" if self.data.model_classes == 1 else "softmax",
                scale=self.data.patch_scale,
            ).to_dict()
        return CheckpointInfo(
            model=model_build_config(self.model),
            classes=self.data.mapping.to_dict(),
            input_size=self.data.size,
            mean=self.data.mean,
            std=self.data.std,
            ignore_index=self.data.mapping.ignore_index,
            config={**self.config.to_dict(), "loss_resolved": self.criterion.describe()},
            epoch=epoch,
            metrics=metrics,
            inference=inference,
        )

    def _save(self, epoch: int, record: dict[str, Any], best: bool) -> None:
        metrics = {"val": record["val"], "val_loss": record["val_loss"]}
        info = self._info(epoch, metrics)
        info.write_id = uuid.uuid4().hex
        save_checkpoint(self.out / "last.safetensors", self.eval_model, info)
        state = {
            "weights_write_id": info.write_id,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": epoch,
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "wall_seconds": record["wall_seconds"],
            "planned_epochs": self.planned_epochs,
        }
        if self.ema is not None:
            state["model"] = self.model.state_dict()
            state["ema_updates"] = int(self.ema.n_averaged)
        save_training_state(self.out / "last.state.safetensors", state)
        if best:
            # The same bytes as last.safetensors, which is only ever replaced by a rename: a
            # link costs nothing and best keeps its content when last moves on.
            atomic_link(self.out / "last.safetensors", self.out / "best.safetensors")
        append_jsonl(self.out / "metrics.jsonl", record)
        plot_curves(read_jsonl(self.out / "metrics.jsonl"), self.out / "curves.png")

    def _save_previews(self) -> None:
        count = min(self.config.previews, len(self.data.val))
        if count == 0:
            return
        segmenter = self._segmenter()
        for index in range(count):
            # A patch model's val image is at its scale and its mask at the image's own size:
            # the prediction is restored to the mask, and the image shown at that size.
            image, mask = self.data.val[index]
            with inference_mode(self.eval_model):
                logits = segmenter.restore(segmenter.logits(image[None]), mask.shape[-2:])
            if image.shape[-2:] != mask.shape[-2:]:
                image = F.interpolate(
                    image[None], size=mask.shape[-2:], mode="bilinear", align_corners=False
                )[0]
            save_preview(
                self.out / f"preview_{index}.png",
                image,
                mask,
                segmenter.labels(logits)[0],
                self.data.mean,
                self.data.std,
                self.data.mapping.palette,
                self.data.mapping.ignore_index,
            )

    # -- the loop ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, stop: dict[str, bool]) -> tuple[float, float, float]:
        config = self.config
        self.step_model.train()
        seed_everything(config.seed + epoch)
        self.train_loader.generator.manual_seed(config.seed + epoch)
        if self.context.enabled:
            self.train_loader.sampler.set_epoch(epoch)
        self.reporter.start_epoch(epoch + 1, self.planned_epochs, len(self.train_loader))
        total, images_seen, started = 0.0, 0, time.perf_counter()
        batches = len(self.train_loader)
        first_plan_step = self._first_plan_step(epoch, batches)
        first_step_end = started
        self.optimizer.zero_grad(set_to_none=True)
        try:
            for step, (images, masks) in enumerate(self.train_loader):
                if stop["stop"] and not self.context.enabled:
                    raise TrainingInterrupted(self._interrupt_message(epoch, step))
                images = to_device(images, self.device, self.precision)
                masks = masks.to(self.device, non_blocking=True)
                with self.precision.autocast(self.device):
                    output = self.step_model(images)
                    loss = compute_loss(
                        output,
                        masks,
                        self.criterion,
                        self.aux_weight,
                        self.data.mapping.ignore_index,
                    )
                interrupted, non_finite = self._agree_to_stop(stop["stop"], loss)
                if interrupted:
                    raise TrainingInterrupted(self._interrupt_message(epoch, step))
                if non_finite:
                    seen = (
                        f"non-finite loss ({loss.item()})"
                        if not torch.isfinite(loss.detach())
                        else "non-finite loss on another rank"
                    )
                    raise RuntimeFailure(
                        f"{seen} at epoch {epoch + 1} step {step + 1}; "
                        f"the last good checkpoint is kept in {self.out}; try a lower `lr`, "
                        "`clip_grad` 1.0 or `amp` off"
                    )
                self.scaler.scale(loss / config.accum_steps).backward()
                if (step + 1) % config.accum_steps == 0 or step + 1 == batches:
                    if config.clip_grad:
                        self.scaler.unscale_(self.optimizer)
                        nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step_iteration()
                    if self.ema is not None:
                        self.ema.update_parameters(self.model)
                value = loss.item()
                if step == 0:
                    first_step_end = time.perf_counter()
                elif step == first_plan_step:
                    step_seconds = (time.perf_counter() - first_step_end) / step
                    self._plan_from_first_steps(step_seconds, step)
                total += value * len(images)
                images_seen += len(images)
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                self.reporter.step(value, self.scheduler.current_lr(), rate)
        except RuntimeError as error:
            if stop["stop"]:  # DataLoader workers died of the same Ctrl-C
                raise TrainingInterrupted(self._interrupt_message(epoch, 0)) from None
            raise error
        seconds = time.perf_counter() - started
        return total / max(images_seen, 1), seconds, images_seen / max(seconds, 1e-9)

    def _agree_to_stop(self, interrupted: bool, loss: torch.Tensor) -> tuple[bool, bool]:
        """(interrupted, non-finite loss) for this step. Under DDP every rank learns what any
        rank saw, before the backward pass that would wait for the others, so a Ctrl-C or a NaN
        on one rank stops all of them at the same step instead of leaving them hung."""
        non_finite = not bool(torch.isfinite(loss.detach()))
        if not self.context.enabled:
            return interrupted, non_finite
        flags = torch.tensor([float(interrupted), float(non_finite)], device=loss.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _interrupt_message(self, epoch: int, step: int) -> str:
        last = self.out / "last.safetensors"
        if last.is_file():
            return (
                f"interrupted in epoch {epoch + 1}; epoch {self.start_epoch_done} is saved. "
                f"Resume with: seg train {self.config.arch} --resume {last}"
            )
        return f"interrupted in epoch {epoch + 1} before any epoch finished; nothing to resume"

    @property
    def start_epoch_done(self) -> int:
        records = read_jsonl(self.out / "metrics.jsonl")
        return records[-1]["epoch"] if records else 0

    def run(self) -> dict[str, Any] | None:
        """Train; returns the summary on rank 0 and None on the other ranks."""
        # --deterministic switches process-wide torch settings: give them back afterwards, so
        # code that trains in-process (a notebook, a test) is not left running slow kernels.
        saved = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
        )
        try:
            return self._run()
        finally:
            # The DDP wrapper holds the process group and its reducer: released before the
            # group is destroyed, not at interpreter exit, where a stopped rank sometimes
            # aborted ("terminate called without an active exception", exit -6).
            if self.context.enabled and hasattr(self, "step_model"):
                self.step_model = self.model
                gc.collect()
            shutdown_distributed(self.context)
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.benchmark = saved[2]

    def _run(self) -> dict[str, Any] | None:
        self._setup()
        config, context = self.config, self.context
        if context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(config.to_toml())
            self._save_split()
            self.reporter.log(
                f"training {config.arch}/{self.backbone} on {self.data.mapping.describe()}; "
                f"{len(self.data.train)} train / {len(self.data.val)} val images at "
                f"{self.data.size[0]}x{self.data.size[1]}; {self.device.type} "
                f"{self.precision.name}{' channels_last' if self.precision.channels_last else ''}; "
                f"loss {self.criterion.describe()}; run folder {self.out}"
            )
            self._write_status("running")
            self.trackers = Trackers(
                tracker_names(config.tracker),
                self.out,
                config.to_dict(),
                config.to_toml(),
                self.reporter.log,
            )
        summary, status = None, "failed"
        try:
            stopped_early = self._epochs()
            if context.is_main:
                self._save_previews()
                summary = self._summary(stopped_early)
            status = "finished"
            return summary
        except TrainingInterrupted:
            status = "interrupted"
            raise
        finally:
            if context.is_main:
                self._write_status(status)
                self.trackers.finish(self.out, summary, status)

    def _write_status(self, status: str) -> None:
        """RUN/status.json: running, finished, interrupted or failed, for `seg runs`."""
        record = {"status": status, "time": datetime.datetime.now(datetime.UTC).isoformat()}
        atomic_write_bytes(self.out / STATUS_FILE, json.dumps(record).encode())

    def _epochs(self) -> bool:
        """The epoch loop; returns whether early stopping ended it."""
        config, context = self.config, self.context
        scored = max(self.data.model_classes, 2)
        stopped_early = False
        session_start = time.perf_counter()
        epoch_ends = [session_start]
        with stop_on_signals() as stop:
            try:
                for epoch in range(self.start_epoch, config.epochs):
                    if epoch >= self.planned_epochs:
                        break
                    train_loss, seconds, rate = self._train_epoch(epoch, stop)
                    if context.enabled:
                        # Ranks end the epoch with their own BatchNorm statistics; score and save
                        # rank 0's model everywhere.
                        averaged = [] if self.ema is None else list(self.ema.module.buffers())
                        for buffer in [*self.model.buffers(), *averaged]:
                            torch.distributed.broadcast(buffer, src=0)
                    result = evaluate(
                        self._segmenter(),
                        self.val_loader,
                        scored_classes=scored,
                        ignore_index=self.data.mapping.ignore_index,
                        criterion=self.criterion,
                        distributed=context.enabled,
                    )
                    miou = result.metrics["miou"]
                    self.scheduler.step_epoch(miou)
                    improved = miou is not None and miou > self.best_miou
                    if improved:
                        self.best_miou, self.best_epoch, self.bad_epochs = miou, epoch + 1, 0
                    else:
                        self.bad_epochs += 1
                    lr = self.scheduler.current_lr()
                    epoch_ends.append(time.perf_counter())
                    wall_seconds = self.wall_before + epoch_ends[-1] - session_start
                    if config.time_limit:
                        recent = epoch_ends[-(PLANNING_EPOCHS + 1) :]
                        cost = (recent[-1] - recent[0]) / (len(recent) - 1)
                        self._plan_to_time_limit(epoch + 1, wall_seconds, cost)
                    record = {
                        "epoch": epoch + 1,
                        "epochs": self.planned_epochs,
                        "train_loss": train_loss,
                        "val_loss": result.loss,
                        "lr": lr,
                        "val": result.metrics,
                        "seconds": seconds,
                        "images_per_second": rate,
                        "wall_seconds": wall_seconds,
                        "ended_at": time.time(),
                    }
                    if context.is_main:
                        self._save(epoch + 1, record, improved)
                        self.reporter.epoch_end(record, improved)
                        self.trackers.log_epoch(record, self.data.mapping.names)
                    if config.patience and self.bad_epochs >= config.patience:
                        stopped_early = True
                        self.reporter.log(
                            f"early stop: no val mIoU gain for {config.patience} epochs"
                        )
                        break
            finally:
                self.reporter.close()
        return stopped_early

    def _first_plan_step(self, epoch: int, batches: int) -> int | None:
        """The step of a new run's first epoch after which `--time-limit` makes its first plan;
        None without a time limit, in later epochs, or in epochs too short to time."""
        if not self.config.time_limit or epoch != 0:
            return None
        step = max(2, math.ceil(batches * FIRST_PLAN_SHARE))
        return step if step < batches - 1 else None

    def _plan_from_first_steps(self, step_seconds: float, timed_steps: int) -> None:
        """The first plan: an epoch estimated as its training steps at the cost of those timed
        so far, plus validation at a third of a step per batch."""
        cost = step_seconds * (
            len(self.train_loader) + VALIDATION_STEP_SHARE * len(self.val_loader)
        )
        self._plan_to_time_limit(0, 0.0, cost, f", estimated from {timed_steps} steps")

    def _plan_to_time_limit(
        self, done: int, wall_seconds: float, cost: float, basis: str = ""
    ) -> None:
        """Plan as many epochs as fit in `--time-limit` at `cost` seconds each (after an epoch:
        the mean of this session's last `PLANNING_EPOCHS` epochs, training, validation and
        checkpoints), at least the epoch under way, and end poly/cosine schedules there: the
        run finishes within the limit with its learning rate annealed. Ranks agree on rank 0's
        plan.

        Recent epochs, not the session's mean: hosts drift, and the mean kept one slow phase
        in every later plan. In a benchmark on an AVX2 EPYC, epochs took 517, 871, 466, 404
        and 418 s; with 923 s left the mean (535 s) planned one more epoch and the run ended
        with 13 % of its budget unused, where the last two (411 s) plan two."""
        remaining = self.config.time_limit * 60 - wall_seconds
        planned = max(1, min(self.config.epochs, done + max(0, math.floor(remaining / cost))))
        if self.context.enabled:
            plan = torch.tensor([planned], device=self.device)
            torch.distributed.broadcast(plan, src=0)
            planned = int(plan.item())
        if planned != self.planned_epochs:
            self.planned_epochs = planned
            self.scheduler.plan_epochs(planned)
            if planned > done:
                self.reporter.log(
                    f"time limit {self.config.time_limit:g} min: planning {planned} "
                    f"epoch{'s' if planned > 1 else ''} "
                    f"({cost:.0f} s each{basis})"
                )
            else:
                self.reporter.log(
                    f"time limit {self.config.time_limit:g} min: stopping after epoch {done}; "
                    "another epoch would not fit"
                )

    def _summary(self, stopped_early: bool) -> dict[str, Any]:
        records = read_jsonl(self.out / "metrics.jsonl")
        best = next((r for r in records if r["epoch"] == self.best_epoch), records[-1])
        return {
            "run": str(self.out),
            "arch": self.config.arch,
            "backbone": self.backbone,
            "epochs_run": records[-1]["epoch"] if records else 0,
            "stopped_early": stopped_early,
            "best_epoch": self.best_epoch,
            "best_checkpoint": str(self.out / "best.safetensors"),
            "class_names": self.data.mapping.names,
            "val": best["val"],
            "val_loss": best["val_loss"],
            "seconds": sum(r["seconds"] for r in records),
            "images_per_second": records[-1]["images_per_second"] if records else None,
            "precision": self.precision.name,
            "channels_last": self.precision.channels_last,
            "device": self.device.type,
        }
