"""`seg serve`: a real uvicorn server on 127.0.0.1 and a real httpx client, on a tiny
untrained UNet-ResNet18 and 40-100 px images.

Each test's docstring names the bug it catches."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from fastapi import HTTPException  # noqa: E402

from segcli.cli.output import Streams, predict  # noqa: E402
from segcli.infer.predict import PredictOptions  # noqa: E402
from segcli.infer.segmenter import Segmenter  # noqa: E402
from segcli.serve import Batcher, ServeConfig, create_app  # noqa: E402
from tests.helpers import write_mock_checkpoint  # noqa: E402

# Small limits, so the 413 cases need only small bodies; every test image fits under them.
MAX_BYTES = 64_000
MAX_PIXELS = 100 * 100
SIZES = [(40, 60), (100, 100), (72, 48), (55, 90), (64, 64), (90, 41), (47, 77), (83, 66)]


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth image with some noise: compresses well, still gives the model structure."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width * 200, ys / height * 200, (xs + ys) / (width + height) * 255], -1)
    circle = (ys - height / 2) ** 2 + (xs - width / 3) ** 2 < (min(height, width) / 4) ** 2
    base[circle] = (230, 30, 60)
    return (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): signature, IHDR with bit
    depth 16 and colour type 2, one zlib IDAT of big-endian rows each after filter byte 0."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@dataclass
class Served:
    url: str
    app: object
    segmenter: Segmenter
    checkpoint: Path
    images: list[Path]

    def stats(self) -> dict[str, int]:
        return self.app.state.service.batcher.stats()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    checkpoint = root / "model.safetensors"
    write_mock_checkpoint(checkpoint)
    images = []
    for index, (height, width) in enumerate(SIZES):
        path = root / "images" / f"img_{index}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(photo(height, width, index)))
        images.append(path)
    segmenter = Segmenter.load(checkpoint, device="cpu", amp="off")
    # A long wait makes the grouping of 8 simultaneous requests certain, not a race.
    config = ServeConfig(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_wait_ms=200)
    app = create_app(segmenter, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", app, segmenter, checkpoint, images)
    server.should_exit = True
    thread.join(timeout=30)


def post_image(served: Served, body: bytes, fmt: str = "index", **kwargs: object) -> httpx.Response:
    headers = kwargs.pop("headers", {"content-type": "image/png"})
    return httpx.post(
        f"{served.url}/predict",
        params={"format": fmt},
        content=body,
        headers=headers,
        timeout=60,
        **kwargs,
    )


def post_together(served: Served, bodies: list[bytes]) -> list[httpx.Response]:
    """Every body posted from its own thread, all released at once, so they reach the server
    together; responses in the order of `bodies`."""
    start = threading.Barrier(len(bodies))

    def call(body: bytes) -> httpx.Response:
        start.wait()
        return post_image(served, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(call, bodies))


def mask_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.array(Image.open(io.BytesIO(response.content)))


def assert_one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert "Traceback" not in response.text
    return detail


def test_health_info_and_docs(served: Served) -> None:
    """Catches: /health or /info missing or failing to serialise (tensors, tuples in the
    spec), /info describing another palette or spec than the one the outputs use, the runtime
    or precision misreported, the OpenAPI docs not served."""
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{served.url}/info").json()
    segmenter = served.segmenter
    assert info["classes"] == segmenter.classes == ["background", "circle", "rectangle"]
    assert info["palette"] == [list(color) for color in segmenter.palette]
    assert info["spec"] == segmenter.info.spec.to_dict()
    assert (info["runtime"], info["device"], info["precision"]) == ("torch", "cpu", "fp32")
    assert info["input_size"] == [64, 64]
    assert info["batching"]["max_batch"] == 8
    assert info["limits"] == {"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}
    assert httpx.get(f"{served.url}/docs").status_code == 200
    schema = httpx.get(f"{served.url}/openapi.json").json()
    assert "image/*" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_outputs_are_byte_identical_to_seg_predict(served: Served, tmp_path: Path) -> None:
    """Catches: the server encoding masks differently from `seg predict` (another PNG mode,
    palette, compression, overlay blend, or masks at the model size instead of the image's),
    the json counts differing from `seg predict --json`, and multipart uploads taking another
    path than raw bodies."""
    source = served.images[3]  # 55 x 90: resized to 64 x 64 and back
    body = source.read_bytes()
    streams = Streams(stdin=io.StringIO(), lines=io.StringIO(), log=io.StringIO())
    for fmt in ("index", "color", "overlay"):
        out = tmp_path / fmt
        options = PredictOptions(
            out=out, format=fmt, device="cpu", amp="off", workers=0, json=fmt == "index"
        )
        predict(served.checkpoint, [str(source)], options, streams)
        expected = (out / f"{source.stem}.png").read_bytes()
        response = post_image(served, body, fmt)
        assert response.status_code == 200, response.text
        assert response.content == expected, fmt
        upload = httpx.post(
            f"{served.url}/predict",
            params={"format": fmt},
            files={"file": (source.name, body, "image/png")},
            timeout=60,
        )
        assert upload.status_code == 200, upload.text
        assert upload.content == expected, f"{fmt} (multipart)"
    record = json.loads(streams.lines.getvalue().splitlines()[0])
    response = post_image(served, body, "json")
    assert response.status_code == 200, response.text
    assert response.json() == {"size": record["size"], "pixels": record["pixels"]}
    assert response.json()["size"] == {"height": 55, "width": 90}


def test_16_bit_and_palette_images_decode_as_seg_predict_decodes_them(
    served: Served, tmp_path: Path
) -> None:
    """Catches: the server decoding uploads with another decoder than `seg predict` uses for
    files (Pillow reduces 16-bit RGB PNGs to 8 bits; torchvision keeps them, scaled to [0, 1]),
    so the same file gave another mask over HTTP than on disk."""
    rgb16 = (
        photo(47, 61, 7).astype(np.uint16) * 257 + (np.arange(61, dtype=np.uint16) % 200)[:, None]
    )
    deep = tmp_path / "deep.png"
    deep.write_bytes(png16(rgb16))
    palette = tmp_path / "palette.png"
    Image.fromarray(photo(50, 40, 8)).convert("P", palette=Image.ADAPTIVE).save(palette)
    for source in (deep, palette):
        out = tmp_path / f"out_{source.stem}"
        options = PredictOptions(out=out, device="cpu", amp="off", workers=0)
        streams = Streams(stdin=io.StringIO(), lines=io.StringIO(), log=io.StringIO())
        predict(served.checkpoint, [str(source)], options, streams)
        response = post_image(served, source.read_bytes())
        assert response.status_code == 200, response.text
        assert response.content == (out / f"{source.stem}.png").read_bytes(), source.name


def test_concurrent_requests_are_batched_and_match_segmenter(served: Served) -> None:
    """Catches: concurrent requests not grouped (one model call per request), batched results
    handed to the wrong request (masks swapped between images of different sizes), and batched
    masks differing from `Segmenter.predict` on each image alone."""
    expected = [served.segmenter.predict(path) for path in served.images]
    bodies = [path.read_bytes() for path in served.images]
    before = served.stats()
    responses = post_together(served, bodies)
    for response, mask in zip(responses, expected, strict=True):
        np.testing.assert_array_equal(mask_of(response), mask)
    after = served.stats()
    calls = after["model_calls"] - before["model_calls"]
    assert after["images"] - before["images"] == len(bodies)
    assert calls < len(bodies), f"{calls} model calls for {len(bodies)} concurrent requests"
    assert after["largest_batch"] > 1


def test_a_bad_body_does_not_disturb_concurrent_good_ones(served: Served) -> None:
    """Catches: one undecodable or truncated upload failing the batch it would have joined,
    crashing the model thread (later requests hanging), or turning into a 500."""
    good = [path.read_bytes() for path in served.images[:6]]
    truncated = good[1][: len(good[1]) // 2]  # a valid header, then the data stops
    bodies = [*good[:3], b"not an image at all", *good[3:], truncated]
    responses = post_together(served, bodies)
    assert_one_line_error(responses[3], 400)
    assert_one_line_error(responses[-1], 400)
    good_responses = responses[:3] + responses[4:-1]
    for response, path in zip(good_responses, served.images[:6], strict=True):
        np.testing.assert_array_equal(mask_of(response), served.segmenter.predict(path))
    assert post_image(served, good[0]).status_code == 200


def test_bad_requests_get_one_line_errors(served: Served) -> None:
    """Catches: an oversized body buffered whole before being refused (and refused only when
    it has a Content-Length), a huge image decoded before its size is checked, undecodable
    bytes or a wrong content type reaching the model as a 500, an unknown format accepted, and
    errors answered with tracebacks or lists instead of one line."""
    detail = assert_one_line_error(post_image(served, b"\0" * (MAX_BYTES + 1)), 413)
    assert "`max_bytes`" in detail

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streaming cap must hold
        for _ in range(MAX_BYTES // 1000 + 2):
            yield b"\0" * 1000

    assert_one_line_error(post_image(served, chunks()), 413)
    # 200 x 200 of one colour: a few hundred bytes, 40 000 pixels.
    big = png_bytes(np.zeros((200, 200, 3), np.uint8))
    assert len(big) < MAX_BYTES
    assert "`max_pixels`" in assert_one_line_error(post_image(served, big), 413)
    detail = assert_one_line_error(post_image(served, b"GIF89a garbage"), 400)
    assert "not a readable image" in detail
    body = served.images[0].read_bytes()
    wrong = post_image(served, body, headers={"content-type": "text/plain"})
    assert "content type text/plain" in assert_one_line_error(wrong, 415)
    assert_one_line_error(post_image(served, body, headers={"content-type": ""}), 415)
    assert "format" in assert_one_line_error(post_image(served, body, "jpeg"), 422)
    no_file = httpx.post(
        f"{served.url}/predict", files={"image": ("a.png", body, "image/png")}, timeout=60
    )
    assert "'file'" in assert_one_line_error(no_file, 400)
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}


def test_failures_inside_the_server_are_one_line_500s(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches: a model call that raises killing the model thread (every later request
    hanging) or answering with a traceback, and an unexpected error in encoding doing the
    same."""
    service = served.app.state.service
    body = served.images[0].read_bytes()

    def broken_model(images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory\nsecond line of a long message")

    monkeypatch.setattr(service.batcher, "run", broken_model)
    assert "out of memory" in assert_one_line_error(post_image(served, body), 500)
    monkeypatch.undo()
    assert post_image(served, body).status_code == 200

    def broken_render(*args: object) -> None:
        raise KeyError("palette")

    monkeypatch.setattr(service, "render", broken_render)
    assert "KeyError" in assert_one_line_error(post_image(served, body), 500)
    monkeypatch.undo()
    assert post_image(served, body).status_code == 200


def test_batcher_groups_by_shape_and_isolates_a_failing_image() -> None:
    """Catches: tensors of different shapes stacked into one batch (a crash for patch models
    and native sizes), more than max_batch images in one call, and one image whose forward
    raises failing the other images of its batch."""
    calls: list[list[tuple[int, ...]]] = []

    def run(images: torch.Tensor) -> torch.Tensor:
        calls.append([tuple(image.shape) for image in images])
        if torch.isnan(images).any():
            raise ValueError("NaN input")
        return images.sum(dim=1, keepdim=True)

    batcher = Batcher(run, max_batch=3, max_wait=0.2)
    small = [torch.full((3, 8, 8), float(index)) for index in range(4)]
    large = [torch.full((3, 16, 16), 10.0 + index) for index in range(2)]
    poisoned = torch.full((3, 8, 8), float("nan"))
    # Collected as [small, poisoned, small], [large, large, small], [small].
    good = [small[0], small[1], *large, small[2], small[3]]
    jobs = [small[0], poisoned, small[1], *large, small[2], small[3]]

    async def main() -> list[torch.Tensor | BaseException]:
        batcher.start()
        try:
            return await asyncio.gather(*map(batcher.submit, jobs), return_exceptions=True)
        finally:
            batcher.close()

    results = asyncio.run(main())
    failed = results.pop(1)
    assert isinstance(failed, HTTPException) and failed.status_code == 500
    assert "NaN input" in failed.detail
    for result, tensor in zip(results, good, strict=True):
        assert torch.equal(result, tensor.sum(dim=0, keepdim=True))
    assert all(len(set(shapes)) == 1 and len(shapes) <= 3 for shapes in calls)
    # The failed batch of 3 was retried image by image: only the poisoned one failed again.
    assert calls[:4] == [[(3, 8, 8)] * 3, [(3, 8, 8)], [(3, 8, 8)], [(3, 8, 8)]]
    stats = batcher.stats()
    assert (stats["failed_calls"], stats["images"], stats["largest_batch"]) == (2, 6, 2)


def test_missing_checkpoint_exits_2_with_one_line(seg) -> None:
    """Catches: a bad checkpoint path starting a server (or binding the port) before failing,
    or failing with a traceback."""
    done = seg("serve", "/no/such.safetensors")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg: error: ") and "such" in lines[0]


def test_busy_port_exits_2_with_one_line(served: Served, seg) -> None:
    """Catches: a port already in use reported by uvicorn's log and exit 1 (or a traceback)
    instead of one line and exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = seg("serve", str(served.checkpoint), "--port", port, "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"seg: error: cannot listen on 127.0.0.1:{port} (Address already in use)"
    ]


def test_without_the_extra_the_error_says_how_to_install(tmp_path: Path) -> None:
    """Catches: `seg serve` without `segcli[serve]` ending in an ImportError traceback instead
    of the pip command to run."""
    blocked = "import sys; sys.modules['fastapi'] = None; sys.argv = ['seg', 'serve', 'x']; "
    done = subprocess.run(
        [sys.executable, "-c", blocked + "from segcli.cli import main; main()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "seg: error: seg serve needs FastAPI, uvicorn and python-multipart; "
        "pip install 'segcli[serve]'"
    ]


def test_help_lists_serve_without_importing_torch(seg) -> None:
    """Catches: the serve command importing torch, FastAPI or uvicorn at module level, which
    makes every `seg --help` slow."""
    assert "serve" in seg("--help").stdout
    done = seg("serve", "--help")
    assert done.returncode == 0 and "--max-batch" in done.stdout
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "segcli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in timed.stderr.splitlines()}
    assert not imported & {"torch", "fastapi", "uvicorn", "starlette"}
