"""`seg predict`: segment images from files, folders or stdin and write one output per image at
the image's original size.

Images are decoded and resized in DataLoader workers while the model runs on the previous batch
(on CPUs with few cores, in the main process by default: see `device.data_workers`).
By default every image is resized to the checkpoint's input size (the size the model was trained
at), so a batch is always one size; `size="native"` keeps each image's own size and batches
images of equal size together (`data.batches_by_size`, from the file headers). With `tile`, each
image keeps its own resolution and is segmented in Gaussian-blended sliding windows
(`inference.sliding_window_probabilities`), whose windows are batched. Scores are resized back to
the original size with bilinear interpolation before the argmax, so class borders stay smooth.
Without TTA or tiles the logits are resized, as `seg eval --full-res` does, and labels are their
argmax; `prob` outputs take the softmax at the original size.

Per-image failures (unreadable file, wrong channels, write error) are reported on stderr by name
and skipped; the run ends with a RuntimeFailure (exit 1) if any happened. stdout carries only
the written paths (or JSON lines), flushed one by one, for shell pipelines."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from segcli.engine.checkpoint import CheckpointInfo
from segcli.engine.device import (
    Precision,
    data_workers,
    resolve_device,
    to_device,
)
from segcli.engine.inference import (
    class_probabilities,
    labels_from_logits,
    labels_from_probabilities,
    load_for_inference,
    probabilities_from_logits,
    sliding_window_probabilities,
)
from segcli.errors import ReaderGone, RuntimeFailure, SegError, UsageError, choose

FORMATS = ("index", "color", "overlay", "prob")
STDIN = "-"
NATIVE = "native"
# Overlay: how much of the class colour shows over the image.
OVERLAY_ALPHA = 0.5
# zlib level 1: label maps are long runs of equal bytes, so the file is barely bigger than at
# the default level 6, and encoding a large map is several times faster.
PNG_COMPRESS_LEVEL = 1


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
        if self.tile is not None and self.size is not None:
            raise UsageError("--tile runs windows at native resolution; drop --size")
        if self.size is not None and self.size != NATIVE:
            from segcli.data import parse_size

            parse_size(self.size)
        if self.out is None and self.json:
            raise UsageError("--out - writes the image bytes to stdout; it cannot go with --json")


@dataclass(frozen=True)
class Job:
    """One input image and where its output goes (None: stdout)."""

    source: Path
    target: Path | None


@dataclass
class Streams:
    """Where paths, output bytes and messages go; the CLI passes the process's own."""

    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    lines: TextIO = field(default_factory=lambda: sys.stdout)
    data: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)
    log: TextIO = field(default_factory=lambda: sys.stderr)


@dataclass
class Summary:
    written: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: Sequence[str], stdin: TextIO) -> list[tuple[Path, Path]]:
    """(image path, output name without suffix) for every input: files as given (a file that is
    not an image fails later, by name, like any unreadable file), folders searched recursively
    for image extensions with their sub-folders kept in the output name so equal stems in
    different folders do not collide, and `-` read from stdin one path per line."""
    from segcli.data.io import is_image_file

    found: list[tuple[Path, Path]] = []
    for argument in inputs:
        names = _stdin_paths(stdin) if argument == STDIN else [argument]
        for name in names:
            path = Path(name)
            if path.is_dir():
                images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
                found += [(p, p.relative_to(path).with_name(p.stem)) for p in images]
            else:
                found.append((path, Path(path.stem)))
    return found


def _stdin_paths(stdin: TextIO) -> list[str]:
    # Only the line end is stripped: file names may start or end with spaces.
    return [line.rstrip("\r\n") for line in stdin if line.strip()]


def plan_jobs(
    found: list[tuple[Path, Path]], options: PredictOptions, log: TextIO
) -> tuple[list[Job], int, int]:
    """Jobs to run, and how many inputs failed (two inputs for one output) or were skipped
    (output exists without --overwrite); both kinds are reported on `log` here, before any
    decoding, so nothing is computed for them."""
    if options.out is None:
        if len(found) != 1:
            raise UsageError(f"--out - writes one image to stdout, but {len(found)} were given")
        return [Job(found[0][0], None)], 0, 0
    suffix = ".npy" if options.format == "prob" else ".png"
    jobs: list[Job] = []
    owners: dict[Path, Path] = {}
    failed = skipped = 0
    for source, name in found:
        target = options.out / name.with_name(name.name + suffix)
        if target in owners:
            _report(log, f"{source}: same output {target} as {owners[target]}; skipped")
            failed += 1
            continue
        owners[target] = source
        if target.exists() and not options.overwrite:
            _report(log, f"{target}: exists; skipped (use --overwrite to replace it)")
            skipped += 1
            continue
        jobs.append(Job(source, target))
    return jobs, failed, skipped


def _report(log: TextIO, message: str) -> None:
    print(f"seg: {message}", file=log, flush=True)


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

        self.paths = list(paths)
        self.in_channels = int(info.model["in_channels"])
        self.transform = build_transforms(size, None, info.mean, info.std)
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
# Outputs


@dataclass(frozen=True)
class OutputSpec:
    """How to turn scores into an output file."""

    format: str
    threshold: float
    class_names: list[str]
    palette: torch.Tensor  # K x 3 uint8

    @classmethod
    def from_info(cls, info: CheckpointInfo, format: str, threshold: float) -> OutputSpec:
        from segcli.data.classes import ClassMapping, default_palette

        count = info.scored_classes
        if count > 256 and format in ("index", "color", "overlay"):
            raise UsageError(f"--format {format} holds at most 256 classes; this model has {count}")
        names = info.class_names[:count]
        names += [str(index) for index in range(len(names), count)]
        colors = ClassMapping.from_dict(info.classes).palette[:count]
        colors += default_palette(count)[len(colors) :]
        return cls(format, threshold, names, torch.tensor(colors, dtype=torch.uint8))

    def render(
        self, scores: torch.Tensor, original: torch.Tensor | None, are_probabilities: bool
    ) -> tuple[bytes, list[int]]:
        """The file's bytes and the pixel count of each class for K x H x W scores
        (probabilities, or logits when the format does not need probabilities)."""
        to_labels = labels_from_probabilities if are_probabilities else labels_from_logits
        labels = to_labels(scores[None], self.threshold)[0].to(torch.uint8).cpu()
        # numpy counts uint8 directly; torch.bincount wants int64 and is ~10x slower here.
        counts = np.bincount(labels.numpy().ravel(), minlength=len(self.class_names)).tolist()
        if self.format == "prob":
            if not are_probabilities:
                scores = probabilities_from_logits(scores[None])[0]
            buffer = io.BytesIO()
            np.save(buffer, scores.to(torch.float16).cpu().numpy())
            return buffer.getvalue(), counts
        if self.format == "overlay":
            assert original is not None  # the dataset keeps originals for overlays
            return _png(blend(original, labels, self.palette).permute(1, 2, 0).numpy()), counts
        return _png(labels.numpy(), self.palette if self.format == "color" else None), counts


def blend(original: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """3 x H x W uint8: the image with each pixel's class colour mixed in. Classes coloured black
    (the background of the default palette) leave the image as it is instead of darkening it."""
    colors = palette[labels.long()].permute(2, 0, 1).float()
    mixed = original.float() * (1 - OVERLAY_ALPHA) + colors * OVERLAY_ALPHA
    painted = (palette.long().sum(dim=1) > 0)[labels.long()]
    return torch.where(painted, mixed.round_(), original.float()).to(torch.uint8)


def _png(array: np.ndarray, palette: torch.Tensor | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        image.putpalette(palette.flatten().tolist())  # makes the L image a palette (P) image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_atomic(target: Path, data: bytes) -> None:
    """Write beside the target and rename, so a consumer reading the printed path never sees a
    half-written file and an interrupted run leaves no truncated output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
        from segcli.engine.onnx_model import load_onnx

        model, info = load_onnx(checkpoint, device)
        return model, info, Precision(None, channels_last=False)
    return load_for_inference(checkpoint, device, amp, compile)


class Predictor:
    """Runs the model over batches and writes each output as soon as it is ready."""

    def __init__(
        self,
        model: Any,
        info: CheckpointInfo,
        precision: Precision,
        device: torch.device,
        options: PredictOptions,
        streams: Streams,
    ) -> None:
        threshold = 0.5 if options.threshold is None else options.threshold
        if options.threshold is not None and not info.binary:
            raise UsageError(
                f"--threshold is for binary (one-logit) models; this one has "
                f"{info.model['classes']} classes and uses the argmax"
            )
        self.model = model
        self.info = info
        self.precision = precision
        self.device = device
        self.options = options
        self.streams = streams
        self.spec = OutputSpec.from_info(info, options.format, threshold)
        # None: each image at its own size (native or tiled).
        self.model_size: tuple[int, int] | None = None
        if options.tile is None and options.size != NATIVE:
            from segcli.data import parse_size

            self.model_size = parse_size(options.size) if options.size else info.input_size
        # Averaging (flips, overlapping windows) needs probabilities; otherwise the logits are
        # resized to the original size, as `seg eval --full-res` does, and only a `prob` output
        # takes their softmax there.
        self.probabilities_out = options.tta or options.tile is not None

    def loader(self, jobs: list[Job]) -> DataLoader:
        from segcli.data import batches_by_size, image_sizes

        paths = [job.source for job in jobs]
        dataset = PredictDataset(
            paths,
            self.info,
            size=self.model_size,
            keep_original=self.options.format == "overlay",
        )
        if self.options.tile is not None:
            batches = [[index] for index in range(len(jobs))]  # the windows are the batch
        elif self.model_size is None:
            batches = batches_by_size(image_sizes(paths), self.options.batch_size)
        else:
            batches = [
                list(range(start, min(start + self.options.batch_size, len(jobs))))
                for start in range(0, len(jobs), self.options.batch_size)
            ]
        workers = min(data_workers(self.options.workers, self.device), len(jobs))
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def scores(self, images: torch.Tensor) -> list[torch.Tensor]:
        """K x h x w scores per image of the batch, on the device: probabilities when
        `self.probabilities_out`, else logits."""
        options = self.options
        if options.tile is not None:
            return [
                sliding_window_probabilities(
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
        if self.probabilities_out:
            batch = class_probabilities(
                self.model, images, precision=self.precision, device=self.device, tta=options.tta
            )
        else:
            images = to_device(images, self.device, self.precision)
            with self.precision.autocast(self.device):
                batch = self.model(images)
        return list(batch)

    def run(
        self, jobs: list[Job], summary: Summary, progress: Callable[[int], None] | None = None
    ) -> None:
        with torch.inference_mode():
            for batch in self.loader(jobs):
                for failure in batch.failures:
                    self.fail(summary, failure.message)
                if batch.images is None:
                    continue
                for sample, scores in zip(batch.samples, self.scores(batch.images), strict=True):
                    self.emit(jobs[sample.index], sample, scores, summary)
                if progress is not None:
                    progress(len(batch.samples) + len(batch.failures))

    def emit(self, job: Job, sample: Sample, scores: torch.Tensor, summary: Summary) -> None:
        """Resize to the original size, render, write, and print the path or JSON record."""
        if tuple(scores.shape[-2:]) != sample.size:
            scores = F.interpolate(
                scores[None].float(), size=sample.size, mode="bilinear", align_corners=False
            )[0]
        data, counts = self.spec.render(scores, sample.original, self.probabilities_out)
        try:
            if job.target is None:
                self.streams.data.write(data)
                self.streams.data.flush()
            else:
                write_atomic(job.target, data)
        except OSError as error:
            if job.target is None:
                raise
            self.fail(summary, f"{job.target}: cannot write ({error.strerror or error})")
            return
        summary.written += 1
        self.announce(job, sample, counts)

    def announce(self, job: Job, sample: Sample, counts: list[int]) -> None:
        if job.target is None:
            return
        if self.options.json:
            record = {
                "input": str(job.source),
                "output": str(job.target),
                "size": {"height": sample.size[0], "width": sample.size[1]},
                "pixels": dict(zip(self.spec.class_names, counts, strict=True)),
            }
            line = json.dumps(record)
        else:
            line = str(job.target)
        # Flushed per line: a pipeline consumer (xargs, a while-read loop) starts on each output
        # while the next is computed, instead of when Python's pipe buffer fills.
        print(line, file=self.streams.lines, flush=True)

    def fail(self, summary: Summary, message: str) -> None:
        if self.options.fail_fast:
            raise RuntimeFailure(f"{message} (stopped by --fail-fast)")
        _report(self.streams.log, f"{message}; skipped")
        summary.failed += 1


def predict(
    checkpoint: Path,
    inputs: Sequence[str],
    options: PredictOptions,
    streams: Streams | None = None,
) -> Summary:
    """The whole command: load the model, find the inputs, run, report. Raises UsageError for a
    bad checkpoint, flag or input list and RuntimeFailure when some inputs failed."""
    streams = streams or Streams()
    options.validate()
    device = resolve_device(options.device)
    model, info, precision = load_predictor(checkpoint, device, options.amp, options.compile)
    predictor = Predictor(model, info, precision, device, options, streams)
    found = expand_inputs(inputs, streams.stdin)
    if not found:
        raise UsageError(f"no images found in {' '.join(inputs)}")
    if options.out is not None:
        if options.out.exists() and not options.out.is_dir():
            raise UsageError(f"--out {options.out}: exists and is not a folder")
        options.out.mkdir(parents=True, exist_ok=True)
    jobs, failed, skipped = plan_jobs(found, options, streams.log)
    if failed and options.fail_fast:
        raise RuntimeFailure("two inputs would write the same output (stopped by --fail-fast)")
    summary = Summary(failed=failed, skipped=skipped)
    started = time.perf_counter()
    try:
        with progress_bar(streams.log, len(jobs)) as advance:
            predictor.run(jobs, summary, advance)
    except BrokenPipeError:
        # The reader went away (e.g. `| head -3`): stop quietly, like other Unix filters, and
        # keep the interpreter from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ReaderGone(f"stdout was closed after {summary.written} outputs") from None
    summary.seconds = time.perf_counter() - started
    rate = summary.written / summary.seconds if summary.seconds > 0 else 0.0
    _report(
        streams.log,
        f"predict: wrote {summary.written} of {len(found)} in {summary.seconds:.1f} s "
        f"({rate:.2f} images/s, {precision.name} on {device.type}); "
        f"{summary.failed} failed, {summary.skipped} skipped",
    )
    if summary.failed:
        raise RuntimeFailure(f"{summary.failed} of {len(found)} inputs failed (reported above)")
    return summary


@contextlib.contextmanager
def progress_bar(log: TextIO, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal (SPEC.md section 5), else nothing."""
    if not log.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=log), transient=True) as bar:
        task = bar.add_task("predict", total=total)
        yield lambda done: bar.advance(task, done)
