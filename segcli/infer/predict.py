"""Image to mask for `seg predict`: decode, run and restore each image to its original size.

Images are decoded and resized in DataLoader workers while the model runs on the previous batch
(on CPUs with few cores, in the main process by default: see `device.data_workers`).
By default every image is resized to the checkpoint's input size (its inference spec), so a
batch is always one size; `size="native"` keeps each image's own size and batches images of
equal size together (`data.batches_by_size`, from the file headers). With `tile`, Gaussian-
weighted windows slide over the resized image (`inference.sliding_window_logits`). TTA and
windows average logits; the logits are resized back to the original size (bilinear) and the
argmax or threshold comes last, exactly as `seg eval --full-res` scores them.

`Predictor.run` yields one `Prediction` (or `Failure`, for an input that could not be decoded)
per input; encoding and writing them is the CLI's (cli/output.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from segcli.checkpoint import CheckpointInfo
from segcli.device import Precision, data_workers
from segcli.errors import SegError, UsageError, choose
from segcli.infer.inference import (
    class_logits,
    load_for_inference,
    sliding_window_logits,
)

FORMATS = ("index", "color", "overlay", "prob")
NATIVE = "native"


@dataclass(frozen=True)
class PredictOptions:
    """Everything `seg predict` does besides which model and which inputs. `out=None` writes
    the single output's bytes to stdout."""

    out: Path | None
    format: str = "index"
    size: str | None = None  # N, HxW or "native"; None: the checkpoint's input size
    threshold: float | None = None
    tile: int | None = None
    overlap: float = 0.25
    tta: bool = False
    batch_size: int = 4
    workers: int | None = None  # None: device.data_workers decides
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    overwrite: bool = False
    fail_fast: bool = False
    json: bool = False

    def validate(self) -> None:
        choose("--format", self.format, FORMATS)
        if self.tile is not None and self.tile < 16:
            raise UsageError(f"--tile {self.tile}: windows must be at least 16 pixels")
        if not 0.0 <= self.overlap <= 0.9:
            raise UsageError(f"--overlap {self.overlap}: use a fraction from 0 to 0.9, e.g. 0.25")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UsageError(f"--threshold {self.threshold}: use a probability in (0, 1)")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise UsageError("--batch-size must be at least 1 and --workers at least 0")
        if self.tile is not None and self.size == NATIVE:
            raise UsageError(
                "--tile slides windows over the image at the model's scale; drop --size native"
            )
        if self.size is not None and self.size != NATIVE:
            from segcli.data import parse_size

            parse_size(self.size)
        if self.out is None and self.json:
            raise UsageError("--out - writes the image bytes to stdout; it cannot go with --json")


# ---------------------------------------------------------------------------------------------
# Decoding in DataLoader workers


@dataclass
class Sample:
    """A decoded input: its position, original (H, W) and, for overlays, the image as RGB uint8."""

    index: int
    size: tuple[int, int]
    original: torch.Tensor | None


@dataclass
class Failure:
    index: int
    message: str


@dataclass
class Batch:
    images: torch.Tensor | None  # N x C x H x W, normalised; None if every input failed
    samples: list[Sample]
    failures: list[Failure]


def describe_error(error: Exception, source: Path) -> str:
    """One line naming the file: segcli errors already do; others get the file prepended."""
    if isinstance(error, SegError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{source}: {type(error).__name__}{': ' + text if text else ''}"


def to_rgb8(image: torch.Tensor) -> torch.Tensor:
    """3 x H x W uint8 of any decoded image (gray, RGBA, 16-bit or float), for overlays."""
    from segcli.data import to_channels

    image = to_channels(image, 3)
    if image.dtype != torch.uint8:
        image = image.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return image


class PredictDataset(Dataset):
    """Decodes and normalises inputs exactly as evaluation does (the training transforms with no
    augmentation), resized to `size`, or kept at their own size when `size` is None (tiling).
    Errors are returned as Failure items instead of raised, so one bad file does not stop the
    DataLoader."""

    def __init__(
        self,
        paths: Sequence[Path],
        info: CheckpointInfo,
        size: tuple[int, int] | None,
        keep_original: bool,
    ) -> None:
        from segcli.data.transforms import build_transforms

        spec = info.spec
        self.paths = list(paths)
        self.in_channels = spec.in_channels
        self.transform = build_transforms(size, None, spec.mean, spec.std)
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Sample] | Failure:
        from torchvision import tv_tensors

        from segcli.data import read_image, to_channels

        path = self.paths[index]
        try:
            decoded = read_image(path)
            image = to_channels(decoded, self.in_channels, source=path)
            tensor = self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
            original = to_rgb8(decoded) if self.keep_original else None
        except Exception as error:  # any failure is this file's failure, reported by name
            return Failure(index, describe_error(error, path))
        return tensor, Sample(index, (int(decoded.shape[-2]), int(decoded.shape[-1])), original)


def collate(items: list[tuple[torch.Tensor, Sample] | Failure]) -> Batch:
    """Stack the decoded images (one size: the model size, one size bucket, or one image when
    tiling) and pass failures through."""
    good = [item for item in items if not isinstance(item, Failure)]
    failures = [item for item in items if isinstance(item, Failure)]
    images = torch.stack([tensor for tensor, _ in good]) if good else None
    return Batch(images, [sample for _, sample in good], failures)


# ---------------------------------------------------------------------------------------------
# The run


def load_predictor(
    checkpoint: Path, device: torch.device, amp: str, compile: bool = False
) -> tuple[Any, CheckpointInfo, Precision]:
    """The model (eager, compiled, or onnxruntime for `.onnx` files), its info and the precision
    to run it at. ONNX graphs run in float32 on onnxruntime's own threads, so no autocast for
    them."""
    if checkpoint.suffix.lower() == ".onnx":
        if compile:
            raise UsageError("--compile applies to .safetensors checkpoints, not ONNX files")
        from segcli.infer.onnx_model import load_onnx

        model, info = load_onnx(checkpoint, device)
        return model, info, Precision(None, channels_last=False)
    return load_for_inference(checkpoint, device, amp, compile)


@dataclass
class Prediction:
    """One input's K x H x W float32 logits at its original size, on the device."""

    index: int
    size: tuple[int, int]
    original: torch.Tensor | None  # the image as RGB uint8, kept for overlays
    logits: torch.Tensor


class Predictor:
    """Runs the model over batches of decoded inputs and yields each prediction as soon as it is
    ready.

    Every image is resized to the model's training size (its inference spec) unless `--size`
    says otherwise; with `tile`, Gaussian-weighted windows of `tile` pixels slide over that
    resized image, so windows see objects at the scale training did, and a window at least the
    model size is the whole-image prediction exactly. Flips (TTA) and windows average logits;
    logits are resized to the original size last."""

    def __init__(
        self,
        model: Any,
        info: CheckpointInfo,
        precision: Precision,
        device: torch.device,
        options: PredictOptions,
    ) -> None:
        if options.threshold is not None and not info.binary:
            raise UsageError(
                f"--threshold is for binary (one-logit) models; this one has "
                f"{info.model['classes']} classes and uses the argmax"
            )
        stride = int(getattr(model, "size_divisor", 1))
        if options.tile is not None and options.tile < stride:
            raise UsageError(
                f"--tile {options.tile} is smaller than the model's stride ({stride} pixels); "
                f"use --tile {stride} or more"
            )
        self.model = model
        self.info = info
        self.precision = precision
        self.device = device
        self.options = options
        # None: each image at its own size (--size native).
        self.model_size: tuple[int, int] | None = None
        if options.size != NATIVE:
            from segcli.data import parse_size

            self.model_size = parse_size(options.size) if options.size else info.spec.size

    def loader(self, paths: Sequence[Path]) -> DataLoader:
        from segcli.data import batches_by_size, image_sizes

        paths = list(paths)
        dataset = PredictDataset(
            paths,
            self.info,
            size=self.model_size,
            keep_original=self.options.format == "overlay",
        )
        if self.model_size is None:
            batches = batches_by_size(image_sizes(paths), self.options.batch_size)
        else:
            batches = [
                list(range(start, min(start + self.options.batch_size, len(paths))))
                for start in range(0, len(paths), self.options.batch_size)
            ]
        workers = min(data_workers(self.options.workers, self.device), len(paths))
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """K x h x w float32 logits per image of the batch, at the batch's scale."""
        options = self.options
        if options.tile is not None:
            return [
                sliding_window_logits(
                    self.model,
                    image,
                    tile=options.tile,
                    overlap=options.overlap,
                    precision=self.precision,
                    device=self.device,
                    tta=options.tta,
                    batch_size=options.batch_size,
                )
                for image in images
            ]
        batch = class_logits(
            self.model, images, precision=self.precision, device=self.device, tta=options.tta
        )
        return list(batch)

    def run(
        self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
    ) -> Iterator[Prediction | Failure]:
        """A Prediction or Failure per path, in batches (not necessarily in path order when
        batching by size); `progress(n)` after each batch of n inputs."""
        with torch.inference_mode():
            for batch in self.loader(paths):
                yield from batch.failures
                if batch.images is not None:
                    for sample, logits in zip(
                        batch.samples, self.logits(batch.images), strict=True
                    ):
                        yield Prediction(
                            sample.index,
                            sample.size,
                            sample.original,
                            restore(logits, sample.size),
                        )
                if progress is not None:
                    progress(len(batch.samples) + len(batch.failures))


def restore(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """K x h x w logits resized (bilinear, align_corners=False) to the original H x W."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
