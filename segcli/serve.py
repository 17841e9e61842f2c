"""`seg serve`: one loaded model behind HTTP, concurrent requests batched into one forward.

A server pays model loading and the first call's kernel selection once, instead of once per
`seg predict` run, and it can group requests that arrive together: a batch of N images costs
much less than N single forwards on most hardware. A request goes through four steps:

1. the body is read with a byte cap (413) and its content type checked (415);
2. decoding (Pillow, after checking the pixel count in the header: 413) and the Segmenter's
   `preprocess` run in a thread pool, off the event loop; a bad image fails alone (400);
3. the preprocessed tensor goes to the `Batcher`, whose one thread owns the model: it takes the
   first queued image, waits up to `max_wait_ms` for more (up to `max_batch`), runs each group
   of equal shape as one `Segmenter.logits` call and resolves every request's asyncio future
   on its event loop (`call_soon_threadsafe`);
4. back in the pool, the logits are restored to the image's size and encoded by `seg predict`'s
   own `OutputSpec.render`, so the PNGs are byte for byte the files `seg predict` writes.

Every error is one line of JSON, `{"detail": "..."}`, never a traceback. This module never
prints: the CLI (`segcli/cli/serve.py`) configures logging and says where the server listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from segcli import __version__
from segcli.data import decode_image_bytes
from segcli.errors import UsageError, first_line
from segcli.infer.encode import OutputSpec
from segcli.infer.predict import to_rgb8
from segcli.infer.segmenter import Segmenter

logger = logging.getLogger(__name__)

Format = Literal["index", "color", "overlay", "json"]
PNG_FORMATS: tuple[str, ...] = ("index", "color", "overlay")
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class ServeConfig:
    """Request limits and batching; the defaults are `seg serve`'s."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_batch: int = 8
    max_wait_ms: float = 5.0
    # Threads decoding, preprocessing and encoding; each may also use torch's intra-op threads,
    # so more than the core count only oversubscribes the CPU the model needs.
    io_threads: int = min(4, os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise UsageError("`max_bytes` and `max_pixels` must be at least 1")
        if self.max_batch < 1 or self.io_threads < 1 or self.max_wait_ms < 0:
            raise UsageError(
                "`max_batch` and io_threads must be at least 1, `max_wait_ms` at least 0"
            )


# ---------------------------------------------------------------------------------------------
# Batching


@dataclass
class _Job:
    tensor: torch.Tensor
    future: asyncio.Future[torch.Tensor]

    def settle(self, result: torch.Tensor | None = None, error: Exception | None = None) -> None:
        """Resolve the future from the model thread: asyncio futures are not thread-safe, so
        the result is handed to the future's own event loop."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            self.future.get_loop().call_soon_threadsafe(_settle, self.future, result, error)


def _settle(
    future: asyncio.Future[torch.Tensor], result: torch.Tensor | None, error: Exception | None
) -> None:
    if future.done():  # the request was cancelled (client gone) while the model ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """Groups images submitted from the event loop into batches for one model thread.

    The thread blocks on the queue for a first image, then collects whatever else is queued
    or arrives within `max_wait` seconds, up to `max_batch` images; images of equal shape run
    as one `run` call (patch models and tiles keep each image's own size, so shapes can
    differ). If a batched call raises, its images are retried one by one, so a single bad
    image fails only its own request. Counters say how well requests were grouped."""

    def __init__(
        self, run: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int, max_wait: float
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.model_calls = 0
        self.images = 0
        self.largest_batch = 0
        self.failed_calls = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="segcli-model", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Finish the images already queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    async def submit(self, tensor: torch.Tensor) -> torch.Tensor:
        """The K x h x w logits of one preprocessed C x h x w image, computed in a batch."""
        if self._thread is None:
            raise RuntimeError("the model thread is not running")
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(tensor, future))
        return await future

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            return {
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000,
                "model_calls": self.model_calls,
                "images": self.images,
                "largest_batch": self.largest_batch,
                "failed_calls": self.failed_calls,
            }

    def _serve(self) -> None:
        # inference_mode is per thread: this one runs every forward.
        with torch.inference_mode():
            running = True
            while running:
                first = self._queue.get()
                if first is None:
                    return
                jobs = [first]
                deadline = time.monotonic() + self.max_wait
                while len(jobs) < self.max_batch:
                    try:
                        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if job is None:
                        running = False
                        break
                    jobs.append(job)
                groups: dict[tuple[int, ...], list[_Job]] = {}
                for job in jobs:
                    groups.setdefault(tuple(job.tensor.shape), []).append(job)
                for group in groups.values():
                    self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        try:
            logits = self.run(torch.stack([job.tensor for job in jobs]))
        except Exception as error:  # the model's failure is these requests', not the server's
            with self._lock:
                self.failed_calls += 1
            logger.error("model call on %d image(s) failed: %s", len(jobs), first_line(error))
            if len(jobs) > 1:
                for job in jobs:
                    self._run_group([job])
            else:
                detail = f"the model failed on this image ({first_line(error)})"
                jobs[0].settle(error=HTTPException(500, detail))
            return
        with self._lock:
            self.model_calls += 1
            self.images += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
        for job, one in zip(jobs, logits, strict=True):
            job.settle(one)


# ---------------------------------------------------------------------------------------------
# Decoding and encoding


@dataclass
class Decoded:
    """A request's image, preprocessed for the model, with what rendering its output needs."""

    tensor: torch.Tensor
    size: tuple[int, int]
    original: torch.Tensor | None  # RGB uint8, for overlays


def decode(body: bytes, max_pixels: int) -> torch.Tensor:
    """C x H x W exactly as `read_image` decodes the same file (`decode_image_bytes`: the same
    decoders, so 16-bit and palette images match `seg predict`). The pixel count comes from the
    header before any pixel is decoded, so a small file cannot expand into gigabytes."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:  # beyond Pillow's own limit
        raise HTTPException(413, first_line(error)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        reason = (
            "unknown format" if isinstance(error, UnidentifiedImageError) else first_line(error)
        )
        raise HTTPException(400, f"not a readable image ({reason})") from None
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"image of {width}x{height} = {width * height} pixels; the limit is "
            f"{max_pixels} (`max_pixels`)",
        )
    try:
        return decode_image_bytes(body, source="request body")
    except UsageError as error:
        raise HTTPException(400, first_line(error)) from None


class Service:
    """A Segmenter with everything a request needs around it: the batcher, the thread pool for
    decoding and encoding, and the output specs of `seg predict`."""

    def __init__(self, segmenter: Segmenter, config: ServeConfig) -> None:
        self.segmenter = segmenter
        self.config = config
        self.batcher = Batcher(
            segmenter.logits, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000
        )
        self.pool: ThreadPoolExecutor | None = None
        info, threshold = segmenter.info, segmenter.threshold
        # Class names and colours, padded as the PNG formats pad them.
        self.legend = OutputSpec.from_info(info, "json", threshold)
        self.specs: dict[str, OutputSpec] = {}
        for name in PNG_FORMATS:
            with contextlib.suppress(UsageError):  # over 256 classes: no PNG; json still works
                self.specs[name] = OutputSpec.from_info(info, name, threshold)

    def open(self) -> None:
        self.pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="segcli-io")
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    async def in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        if self.pool is None:
            raise RuntimeError("the service is not open")
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def prepare(self, body: bytes, output_format: str) -> Decoded:
        image = decode(body, self.config.max_pixels)
        try:
            tensor = self.segmenter.preprocess(image, source="image")
        except UsageError as error:  # e.g. channels the model cannot take
            raise HTTPException(400, str(error)) from None
        original = to_rgb8(image) if output_format == "overlay" else None
        return Decoded(tensor, (int(image.shape[-2]), int(image.shape[-1])), original)

    def render(self, decoded: Decoded, logits: torch.Tensor, output_format: str) -> Response:
        with torch.inference_mode():
            restored = self.segmenter.restore(logits, decoded.size)
            if output_format == "json":
                labels = self.segmenter.labels(restored[None])[0].cpu().numpy()
                names = self.legend.class_names
                counts = np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
                height, width = decoded.size
                record = {
                    "size": {"height": height, "width": width},
                    "pixels": dict(zip(names, counts.tolist(), strict=True)),
                }
                return JSONResponse(record)
            data, _ = self.specs[output_format].render(restored, decoded.original)
        return Response(data, media_type="image/png")

    def describe(self) -> dict[str, Any]:
        segmenter = self.segmenter
        return {
            "version": __version__,
            "model": segmenter.info.model,
            "classes": self.legend.class_names,
            "palette": self.legend.palette.tolist(),
            "binary": segmenter.binary,
            "threshold": segmenter.threshold if segmenter.binary else None,
            "spec": segmenter.info.spec.to_dict(),
            "runtime": segmenter.runtime.name,
            "device": str(segmenter.device),
            "precision": segmenter.precision.name,
            "channels_last": segmenter.precision.channels_last,
            "input_size": None if segmenter.size is None else list(segmenter.size),
            "tta": segmenter.tta,
            "tile": segmenter.tile,
            "overlap": segmenter.overlap,
            "formats": [*self.specs, "json"],
            "limits": {"max_bytes": self.config.max_bytes, "max_pixels": self.config.max_pixels},
            "batching": self.batcher.stats(),
        }


async def read_image_body(request: Request, max_bytes: int) -> bytes:
    """The encoded image of a request: the raw body for an image/* content type, else the
    `file` field of a multipart form. The byte cap holds before anything is buffered beyond
    it, whether or not the client sent a Content-Length."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not media.startswith("image/") and media != MULTIPART:
        shown = media or "none"
        raise HTTPException(
            415,
            f"content type {shown}: send the image as the body with an image/* content type, "
            f"or as the 'file' field of {MULTIPART}",
        )
    too_large = HTTPException(413, f"body over {max_bytes} bytes (`max_bytes`)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if media != MULTIPART:
        return body

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, f"{MULTIPART} body without a 'file' field holding the image")
        return await upload.read()
    finally:
        await form.close()


# ---------------------------------------------------------------------------------------------
# The application

REQUEST_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"detail": {"type": "string"}},
            "required": ["detail"],
        }
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": ERROR_BODY}
    for status, description in {
        400: "Undecodable image, malformed form or no 'file' field",
        413: "Body over `max_bytes`, or image over `max_pixels`",
        415: "Neither an image/* body nor multipart/form-data",
        422: "Unknown format",
        500: "The model failed on this image",
    }.items()
}


def create_app(segmenter: Segmenter, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving `segmenter`. The model thread and the thread pool live
    for the application's lifespan (started and stopped by the ASGI server); the service, with
    its batching counters, is `app.state.service`."""
    service = Service(segmenter, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.open()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="segcli",
        version=__version__,
        description="Semantic segmentation with one loaded model ('seg serve').",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc'][1:])}: {problem['msg']}"
            for problem in error.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        # The client gets one line; the ASGI server still logs the traceback for whoever runs it.
        detail = f"internal error ({type(error).__name__}: {first_line(error)})"
        return JSONResponse({"detail": detail}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the server answers."""
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The model: classes, palette, input spec, runtime, device, precision; the limits and
        the batching counters so far."""
        return service.describe()

    @app.post(
        "/predict",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {}, "application/json": {}},
                "description": "The mask as a PNG, or the pixel counts with format=json",
            },
            **ERRORS,
        },
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def predict(
        request: Request,
        output_format: Annotated[
            Format,
            Query(
                alias="format",
                description="index (class indices, mode L PNG) | color (palette PNG) | "
                "overlay (the image with class colours) | json (size and pixels per class)",
            ),
        ] = "index",
    ) -> Response:
        """Segment one image, sent as the body (image/* content type) or as the `file` field
        of a multipart form; the output has the image's size, as `seg predict` writes it."""
        if output_format != "json" and output_format not in service.specs:
            count = segmenter.info.scored_classes
            raise HTTPException(
                400, f"format {output_format} holds at most 256 classes, not {count}"
            )
        body = await read_image_body(request, service.config.max_bytes)
        decoded = await service.in_pool(service.prepare, body, output_format)
        logits = await service.batcher.submit(decoded.tensor)
        return await service.in_pool(service.render, decoded, logits, output_format)

    return app
