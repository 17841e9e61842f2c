"""Everything `seg predict` reads from and writes to the outside: input discovery (files,
folders, `-` for paths on stdin), output planning, encoding (PNG index/colour/overlay, `.npy`
probabilities), atomic writes, the path or JSON line printed per output, the progress bar and
a closed stdout (SIGPIPE). The image-to-mask work itself is `segcli.infer.predict.Predictor`.

Per-image failures (unreadable file, wrong channels, write error) are reported on stderr by name
and skipped; the run ends with a RuntimeFailure (exit 1) if any happened. stdout carries only
the written paths (or JSON lines), flushed one by one, for shell pipelines."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from segcli.errors import ReaderGone, RuntimeFailure, UsageError, as_flags
from segcli.files import atomic_write_bytes
from segcli.infer.encode import OutputSpec
from segcli.infer.ensemble import describe as describe_ensemble
from segcli.infer.predict import Prediction, PredictOptions, Predictor
from segcli.infer.runtimes import describe_runtime
from segcli.infer.segmenter import Segmenter

STDIN = "-"


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
    # Core messages (per-image failures, ensemble descriptions) name settings as `size`.
    print(f"seg: {as_flags(message)}", file=log, flush=True)


class PredictionWriter:
    """Encodes each prediction, writes it atomically (or to stdout) and prints its path or JSON
    record as soon as it is ready."""

    def __init__(self, segmenter: Segmenter, options: PredictOptions, streams: Streams) -> None:
        self.options = options
        self.streams = streams
        self.spec = OutputSpec.from_info(segmenter.info, options.format, segmenter.threshold)

    def write_all(
        self,
        predictor: Predictor,
        jobs: list[Job],
        summary: Summary,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        for result in predictor.run([job.source for job in jobs], progress):
            if isinstance(result, Prediction):
                self.emit(jobs[result.index], result, summary)
            else:
                self.fail(summary, result.message)

    def emit(self, job: Job, prediction: Prediction, summary: Summary) -> None:
        data, counts = self.spec.render(prediction.logits, prediction.original)
        try:
            if job.target is None:
                self.streams.data.write(data)
                self.streams.data.flush()
            else:
                atomic_write_bytes(job.target, data)
        except OSError as error:
            if job.target is None:
                raise
            self.fail(summary, f"{job.target}: cannot write ({error.strerror or error})")
            return
        summary.written += 1
        self.announce(job, prediction, counts)

    def announce(self, job: Job, prediction: Prediction, counts: list[int]) -> None:
        if job.target is None:
            return
        if self.options.json:
            record = {
                "input": str(job.source),
                "output": str(job.target),
                "size": {"height": prediction.size[0], "width": prediction.size[1]},
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
    checkpoint: str | Path | Sequence[str | Path],
    inputs: Sequence[str],
    options: PredictOptions,
    streams: Streams | None = None,
) -> Summary:
    """The whole command: load the model (several checkpoints, or a run folder of folds, as one
    ensemble), find the inputs, run, report. Raises UsageError for a bad checkpoint, flag or
    input list and RuntimeFailure when some inputs failed."""
    streams = streams or Streams()
    options.validate()
    segmenter = Segmenter.load(
        checkpoint,
        device=options.device,
        amp=options.amp,
        runtime=options.runtime,
        compile=options.compile,
        **options.segmenter_options(),
    )
    if len(segmenter.checkpoints) > 1:
        _report(streams.log, describe_ensemble(segmenter.checkpoints))
    if segmenter.runtime.automatic:
        _report(streams.log, describe_runtime(segmenter.runtime))
    predictor = Predictor(segmenter, options)
    writer = PredictionWriter(segmenter, options, streams)
    if segmenter.off_scale:
        shown = (
            "each image's own size"
            if segmenter.size is None
            else "x".join(map(str, segmenter.size))
        )
        _report(
            streams.log,
            f"warning: --size runs the model at {shown}, off the scale it was trained at "
            f"({segmenter.spec.describe()}); expect worse masks",
        )
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
            writer.write_all(predictor, jobs, summary, advance)
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
        f"({rate:.2f} images/s, {segmenter.precision.name} on {segmenter.device.type}); "
        f"{summary.failed} failed, {summary.skipped} skipped",
    )
    if summary.failed:
        raise RuntimeFailure(f"{summary.failed} of {len(found)} inputs failed (reported above)")
    return summary


@contextlib.contextmanager
def progress_bar(log: TextIO, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal, else nothing (logs and pipes
    get one line per event instead)."""
    if not log.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=log), transient=True) as bar:
        task = bar.add_task("predict", total=total)
        yield lambda done: bar.advance(task, done)
