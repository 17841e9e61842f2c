"""`seg serve CHECKPOINT`: keep one model loaded behind HTTP (the `segcli[serve]` extra).

The server itself is `segcli.serve`; this command checks the extra is installed, loads the
model and binds the socket before serving, so a bad checkpoint or a busy port is a one-line
error (exit 2) rather than a server that starts and dies."""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from segcli.cli._options import Amp, Device, Overlap, Runtime, Threshold, Tile, Tta
from segcli.errors import UsageError

SERVER_PANEL = "Server"


def serve(
    checkpoint: Annotated[
        Path, typer.Argument(help="A .safetensors checkpoint, or an .onnx file from seg export.")
    ],
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; 0.0.0.0 exposes the server to the network.",
            rich_help_panel=SERVER_PANEL,
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="TCP port (0: any free one).", rich_help_panel=SERVER_PANEL
        ),
    ] = 8000,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            help="Most concurrent images run as one forward.",
            rich_help_panel=SERVER_PANEL,
        ),
    ] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms",
            min=0,
            help="How long the first queued image waits for others to share its batch.",
            rich_help_panel=SERVER_PANEL,
        ),
    ] = 5.0,
    max_bytes: Annotated[
        int,
        typer.Option(
            "--max-bytes",
            min=1,
            help="Largest request body (413 above).",
            rich_help_panel=SERVER_PANEL,
        ),
    ] = 20_000_000,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            min=1,
            help="Largest image, width x height, read from its header (413 above).",
            rich_help_panel=SERVER_PANEL,
        ),
    ] = 40_000_000,
    threshold: Threshold = None,
    tile: Tile = None,
    overlap: Overlap = 0.25,
    tta: Tta = False,
    device: Device = "auto",
    amp: Amp = "auto",
    runtime: Runtime = "auto",
) -> None:
    """Serve a model over HTTP until Ctrl-C.

    `POST /predict` takes an image (the body, with an image/* content type, or the `file`
    field of a multipart form) and returns its mask as `seg predict` writes it
    (`?format=index|color|overlay|json`); `GET /health`, `GET /info`, API docs at /docs.
    Concurrent requests are batched into one forward. Logs go to stderr."""
    try:
        import fastapi  # noqa: F401
        import uvicorn

        _import_multipart()
    except ImportError:
        raise UsageError(
            "seg serve needs FastAPI, uvicorn and python-multipart; pip install 'segcli[serve]'"
        ) from None

    from segcli.infer.segmenter import Segmenter
    from segcli.serve import ServeConfig, create_app

    config = ServeConfig(
        max_bytes=max_bytes, max_pixels=max_pixels, max_batch=max_batch, max_wait_ms=max_wait_ms
    )
    segmenter = Segmenter.load(
        checkpoint,
        device=device,
        amp=amp,
        runtime=runtime,
        tta=tta,
        tile=tile,
        overlap=overlap,
        threshold=threshold,
    )
    if segmenter.runtime.automatic:
        from segcli.infer.runtimes import describe_runtime

        print(f"seg: serve: {describe_runtime(segmenter.runtime)}", file=sys.stderr, flush=True)
    listener = _bind(host, port)
    bound = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(segmenter, config),
            host=host,
            port=bound,
            log_config=_log_config(),
            timeout_graceful_shutdown=10,
        )
    )
    shown = f"[{host}]" if ":" in host else host
    info = segmenter.info
    model = f"{info.model['arch']}/{info.model['backbone']}"
    print(
        f"seg: serve: {model} ({info.scored_classes} classes, "
        f"{segmenter.precision.name} on {segmenter.device}) at http://{shown}:{bound} "
        f"(docs at /docs); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[listener])


def _import_multipart() -> None:
    """Starlette parses forms with python-multipart, imported as python_multipart since 0.0.13
    and as multipart before; without it a form upload would fail only at the first request."""
    try:
        import python_multipart  # noqa: F401
    except ImportError:
        import multipart  # noqa: F401


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a busy port or an unknown host is a one-line error."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        listener = socket.socket(family, kind, protocol)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen()
    except OSError as error:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return listener


def _log_config() -> dict[str, Any]:
    """uvicorn's logging with the access log moved to stderr (stdout is for data, and a server
    has none) and segcli's own messages (failed model calls) in the same format."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["segcli"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
