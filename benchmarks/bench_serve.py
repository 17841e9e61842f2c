"""Load test of `seg serve` on loopback: concurrent clients' images/s and latency against the
`seg predict` path and the model alone at batch 1, on the same images and model object.

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port); the clients are
asyncio tasks sharing one httpx connection pool, each posting PNGs one after another, so at
most `--clients` requests are in flight. Three rates, measured one after the other on the same
warmed-up Segmenter:

- server: successful responses per wall second under load, with p50/p99 latency, errors and
  the batcher's grouping (model calls, mean batch);
- predict: `seg predict`'s Predictor (decode, batches of `--max-batch`, restore) and PNG
  encoding (`OutputSpec.render`) over as many images, without writing files;
- model batch 1: `Segmenter.logits` on one preprocessed image in a loop, what a server that
  did not batch could at best reach.

The clients share the CPU (and the GIL) with the server, as a client on the same machine
would, so the server rate is a lower bound of what remote clients would see.

    python benchmarks/bench_serve.py [--checkpoint PATH] [--size 256] [--clients 8]
        [--requests 50] [--max-batch 8] [--max-wait-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from segcli.checkpoint import CheckpointInfo, model_build_config, save_checkpoint
from segcli.cli.output import OutputSpec
from segcli.data import ClassMapping, read_image
from segcli.infer.predict import PredictOptions, Predictor
from segcli.infer.segmenter import Segmenter
from segcli.models import build_model
from segcli.serve import ServeConfig, create_app


def write_checkpoint(path: Path, size: int) -> None:
    """An untrained UNet-ResNet18 (3 classes) trained, as far as its spec says, at size x size."""
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", classes=3)
    info = CheckpointInfo(
        model=model_build_config(model),
        classes=ClassMapping("index", ["background", "a", "b"]).to_dict(),
        input_size=(size, size),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    save_checkpoint(path, model, info)


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """Photo-like 4:3 PNGs (gradients plus noise) a bit larger than the model input, so decoding
    and resizing cost what real uploads cost."""
    rng = np.random.default_rng(0)
    height, width = size, size * 4 // 3
    ramp = np.linspace(0, 200, width, dtype=np.float32)
    paths = []
    for index in range(count):
        base = (
            ramp[None, :, None] * rng.uniform(0.3, 1, 3) + np.linspace(0, 40, height)[:, None, None]
        )
        noisy = base + rng.normal(0, 12, (height, width, 3))
        path = folder / f"img_{index:03}.png"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def model_batch1_rate(segmenter: Segmenter, image: Path, iterations: int) -> float:
    """Images/s of `Segmenter.logits` on one preprocessed image, after two warm-up calls."""
    tensor = segmenter.preprocess(read_image(image))[None]
    with torch.inference_mode():
        for _ in range(2):
            segmenter.logits(tensor)
        started = time.perf_counter()
        for _ in range(iterations):
            segmenter.logits(tensor)
    return iterations / (time.perf_counter() - started)


def predict_rate(segmenter: Segmenter, paths: list[Path], batch_size: int) -> float:
    """Images/s of `seg predict`'s path (Predictor in the main process, PNG encoding), files
    not written."""
    predictor = Predictor(segmenter, PredictOptions(out=None, batch_size=batch_size, workers=0))
    spec = OutputSpec.from_info(segmenter.info, "index", segmenter.threshold)
    started = time.perf_counter()
    for prediction in predictor.run(paths):
        spec.render(prediction.logits, None)
    return len(paths) / (time.perf_counter() - started)


def on_thread(function: Callable[..., float], *args: object) -> float:
    """`function(*args)` on a fresh thread, as the server's model thread runs it. Torch's OpenMP
    team behaves differently on the main thread: on a 2-core machine shared with other jobs, a
    64 px UNet-ResNet18 forward took 800 ms there and 30 ms on a new thread, which would make
    the ratios measure OpenMP instead of the server."""
    results: list[float] = []
    thread = threading.Thread(target=lambda: results.append(function(*args)))
    thread.start()
    thread.join()
    return results[0]


class Running:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, for a `with` block."""

    def __init__(self, app: object) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def load(url: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, object]:
    """`clients` tasks each posting `requests` images in turn; latency per request, wall time
    for all of them."""
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def post(index: int) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/predict",
                    content=bodies[index % len(bodies)],
                    headers={"content-type": "image/png"},
                )
            except httpx.HTTPError as error:
                errors.append(type(error).__name__)
                return
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:80]}")
                return
            latencies.append(time.perf_counter() - started)

        async def client_task(number: int) -> None:
            for request in range(requests):
                await post(number * requests + request)

        await asyncio.gather(*(post(index) for index in range(clients)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client_task(number) for number in range(clients)))
        wall = time.perf_counter() - started
    return {
        "requests": clients * requests,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "images_per_s": round(len(latencies) / wall, 3),
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 0.5), 1) if latencies else None,
            "p99": round(1000 * percentile(latencies, 0.99), 1) if latencies else None,
            "mean": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained UNet-ResNet18")
    parser.add_argument("--size", type=int, default=256, help="input size of the default model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=16, help="distinct images, cycled")
    parser.add_argument("--forward-iters", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = root / "model.safetensors"
            write_checkpoint(checkpoint, args.size)
        segmenter = Segmenter.load(checkpoint, device=args.device, amp=args.amp)
        size = segmenter.spec.size[0]
        folder = root / "images"
        folder.mkdir()
        paths = write_images(folder, args.images, size)
        bodies = [path.read_bytes() for path in paths]
        total = args.clients * args.requests

        batch1 = on_thread(model_batch1_rate, segmenter, paths[0], args.forward_iters)
        predicted = on_thread(
            predict_rate, segmenter, [paths[i % len(paths)] for i in range(total)], args.max_batch
        )
        app = create_app(
            segmenter, ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        )
        with Running(app) as url:
            before = app.state.service.batcher.stats()
            served = asyncio.run(load(url, bodies, args.clients, args.requests))
            after = app.state.service.batcher.stats()
    calls = after["model_calls"] - before["model_calls"]
    images = after["images"] - before["images"]
    served["model_calls"] = calls
    served["mean_batch"] = round(images / calls, 2) if calls else None
    served_rate = float(served["images_per_s"])
    model = segmenter.info.model
    report = {
        "model": f"{model['arch']}/{model['backbone']}",
        "size": list(segmenter.spec.size),
        "image_size": [size, size * 4 // 3],
        "device": segmenter.device.type,
        "precision": segmenter.precision.name,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "server": served,
        "predict_images_per_s": round(predicted, 3),
        "model_batch1_images_per_s": round(batch1, 3),
        "ratios": {
            "server_vs_model_batch1": round(served_rate / batch1, 3),
            "server_vs_predict": round(served_rate / predicted, 3),
            "predict_vs_model_batch1": round(predicted / batch1, 3),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
