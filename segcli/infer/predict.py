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
from torch.utils.data import DataLoader, Dataset

from segcli.device import data_workers
from segcli.errors import SegError, UsageError, choose
from segcli.infer.encode import FORMATS
from segcli.infer.segmenter import Preprocess, Segmenter


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
    runtime: str = "torch"  # the CLI's default is auto
    compile: bool = False
    overwrite: bool = False
    fail_fast: bool = False
    json: bool = False

    def segmenter_options(self) -> dict[str, Any]:
        """The Segmenter's keywords these flags set (besides device, precision and compile)."""
        return {
            "tta": self.tta,
            "tile": self.tile,
            "overlap": self.overlap,
            "threshold": self.threshold,
            "size": self.size,
            "window_batch": self.batch_size,
        }

    def validate(self) -> None:
        choose("`format`", self.format, FORMATS)
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise UsageError("`batch_size` must be at least 1 and `workers` at least 0")
        if self.out is None and self.json:
            raise UsageError("`out` - writes the image bytes to stdout; it cannot go with `json`")


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
    """Decodes inputs and prepares them with the segmenter's `Preprocess` (the evaluation
    transform of training). Errors are returned as Failure items instead of raised, so one bad
    file does not stop the DataLoader."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, keep_original: bool) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Sample] | Failure:
        from segcli.data import read_image

        path = self.paths[index]
        try:
            decoded = read_image(path)
            tensor = self.preprocess(decoded, source=path)
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


@dataclass
class Prediction:
    """One input's K x H x W float32 logits at its original size, on the device."""

    index: int
    size: tuple[int, int]
    original: torch.Tensor | None  # the image as RGB uint8, kept for overlays
    logits: torch.Tensor


class Predictor:
    """Runs a Segmenter over decoded inputs in batches and yields each prediction as soon as it
    is ready: decoding and preprocessing in DataLoader workers, the model on the previous
    batch."""

    def __init__(self, segmenter: Segmenter, options: PredictOptions) -> None:
        self.segmenter = segmenter
        self.options = options

    def loader(self, paths: Sequence[Path]) -> DataLoader:
        from segcli.data import batches_by_size, build_loader, image_sizes

        paths = list(paths)
        dataset = PredictDataset(
            paths, self.segmenter.preprocess, keep_original=self.options.format == "overlay"
        )
        if self.segmenter.size is None:
            batches = batches_by_size(image_sizes(paths), self.options.batch_size)
        else:
            batches = [
                list(range(start, min(start + self.options.batch_size, len(paths))))
                for start in range(0, len(paths), self.options.batch_size)
            ]
        device = self.segmenter.device
        workers = min(data_workers(self.options.workers, device), len(paths))
        return build_loader(
            dataset,
            self.options.batch_size,
            shuffle=False,
            workers=workers,
            seed=0,
            device_type=device.type,
            batch_sampler=batches,
            collate_fn=collate,
        )

    def run(
        self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
    ) -> Iterator[Prediction | Failure]:
        """A Prediction or Failure per path, in batches (not necessarily in path order when
        batching by size); `progress(n)` after each batch of n inputs."""
        segmenter = self.segmenter
        with torch.inference_mode():
            for batch in self.loader(paths):
                yield from batch.failures
                if batch.images is not None:
                    logits = segmenter.logits(batch.images)
                    for sample, one in zip(batch.samples, logits, strict=True):
                        yield Prediction(
                            sample.index,
                            sample.size,
                            sample.original,
                            segmenter.restore(one, sample.size),
                        )
                if progress is not None:
                    progress(len(batch.samples) + len(batch.failures))
