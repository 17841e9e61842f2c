"""`seg predict`: shell pipelines, original sizes, formats, tiling, TTA, ONNX and bad inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcli.checkpoint import CheckpointInfo, load_model, model_build_config, save_checkpoint
from segcli.cli.output import Streams, expand_inputs, predict
from segcli.data import ClassMapping, read_image
from segcli.device import Precision
from segcli.errors import RuntimeFailure, UsageError
from segcli.infer.encode import OutputSpec
from segcli.infer.inference import (
    class_logits,
    sliding_window_logits,
    window_starts,
)
from segcli.infer.predict import PredictDataset, PredictOptions, Predictor
from segcli.infer.segmenter import Preprocess, Segmenter

CPU = torch.device("cpu")
FP32 = Precision(None, channels_last=False)
NAMES = ["background", "road", "car"]
# Odd sizes (H, W) so resizing to the 64x64 model size and back cannot hide an off-by-one.
SIZES = {"a.png": (37, 51), "b.jpg": (70, 45)}


def make_info(model: torch.nn.Module, names: list[str]) -> CheckpointInfo:
    kind = "binary" if len(names) == 2 and model.build_config["classes"] == 1 else "index"
    return CheckpointInfo(
        model=model_build_config(model),
        classes=ClassMapping(kind, names).to_dict(),
        input_size=(64, 64),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class ResUNet18 at 64x64 whose untrained logits have a standard deviation of about
    0.35 on random images: confident, varied predictions instead of near-uniform ones, which
    would hide differences, at the scale the tiling tolerances below were measured at."""
    from segcli.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", classes=3)
    with torch.no_grad():
        logit_std = model.eval()(torch.randn(1, 3, 96, 80)).std()
        model.head.classify.weight.mul_(0.35 / logit_std)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, model, make_info(model, NAMES))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            folder / name
        )
    return folder


def options(out: Path | None, **overrides: object) -> PredictOptions:
    # No workers in-process: forking the pytest process is slower than decoding two tiny images.
    return PredictOptions(out=out, workers=0, amp="off", **overrides)


def segmenter(model: object, info: CheckpointInfo, opts: PredictOptions) -> Segmenter:
    return Segmenter(model, info, device=CPU, precision=FP32, **opts.segmenter_options())


def run(checkpoint: Path, inputs: list[str], opts: PredictOptions, stdin: str = "") -> Streams:
    streams = Streams(
        stdin=io.StringIO(stdin), lines=io.StringIO(), data=io.BytesIO(), log=io.StringIO()
    )
    predict(checkpoint, inputs, opts, streams)
    return streams


def run_pipeline(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300
    )


# --- CLI and shell pipelines ------------------------------------------------------------------


def test_shell_pipeline_stdout_holds_exactly_the_paths(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    for name in SIZES:
        (tmp_path / name).write_bytes((images / name).read_bytes())
    result = run_pipeline(
        f"printf 'a.png\\nb.jpg\\n' | {sys.executable} -m segcli predict {checkpoint} - "
        "--out d --workers 1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "d/a.png\nd/b.png\n"
    for name, (height, width) in SIZES.items():
        with Image.open(tmp_path / "d" / f"{Path(name).stem}.png") as mask:
            assert mask.mode == "L"
            assert (mask.height, mask.width) == (height, width)
            assert np.asarray(mask).max() < len(NAMES)
    assert "wrote 2 of 2" in result.stderr


def test_closed_stdout_stops_quietly_like_a_unix_filter(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    # `true` exits at once without reading, so seg's first printed path meets a closed pipe.
    result = run_pipeline(
        f"{sys.executable} -m segcli predict {checkpoint} {images} --out d | true; "
        "echo status ${PIPESTATUS[0]} >&2",
        cwd=tmp_path,
    )
    assert result.stderr.strip().splitlines()[-1] == "status 141"
    assert "error" not in result.stderr and "Traceback" not in result.stderr


def test_corrupt_file_among_good_ones(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in SIZES:
        (folder / "sub" / name).write_bytes((images / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    out = tmp_path / "out"
    command = ["predict", str(checkpoint), str(folder), "--out", str(out), "--format", "color"]
    result = subprocess.run(
        [sys.executable, "-m", "segcli", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    written = result.stdout.splitlines()
    assert written == [str(tmp_path / "out" / "sub" / "a.png"), str(tmp_path / "out/sub/b.png")]
    assert "broken.png" in result.stderr and "notes.txt" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "seg: error: 1 of 3 inputs failed (reported above)"
    with Image.open(written[0]) as mask:
        assert mask.mode == "P" and (mask.height, mask.width) == SIZES["a.png"]


def test_invalid_checkpoint_exits_2_with_one_line(images: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    result = subprocess.run(
        [sys.executable, "-m", "segcli", "predict", str(bad), str(images), "--out", "o"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("seg: error: ") and "bad.safetensors" in result.stderr


def test_missing_checkpoint_is_a_usage_error(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such checkpoint"):
        run(tmp_path / "nope.safetensors", [str(images)], options(tmp_path))


# --- outputs ----------------------------------------------------------------------------------


def test_json_records_and_every_format(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    source = str(images / "a.png")
    height, width = SIZES["a.png"]
    lines = run(checkpoint, [source], options(tmp_path / "i", json=True)).lines.getvalue()
    record = json.loads(lines)
    assert record["input"] == source and record["output"] == str(tmp_path / "i" / "a.png")
    assert record["size"] == {"height": height, "width": width}
    assert list(record["pixels"]) == NAMES and sum(record["pixels"].values()) == height * width
    index = np.asarray(Image.open(record["output"]))
    assert [int((index == k).sum()) for k in range(3)] == list(record["pixels"].values())

    run(checkpoint, [source], options(tmp_path / "c", format="color"))
    with Image.open(tmp_path / "c" / "a.png") as color:
        assert color.mode == "P" and np.array_equal(np.asarray(color), index)
        palette = ClassMapping("index", NAMES).palette
        assert color.getpalette()[:9] == [c for rgb in palette for c in rgb]

    run(checkpoint, [source], options(tmp_path / "o", format="overlay"))
    with Image.open(tmp_path / "o" / "a.png") as overlay:
        assert overlay.mode == "RGB" and (overlay.height, overlay.width) == (height, width)

    run(checkpoint, [source], options(tmp_path / "p", format="prob"))
    probabilities = np.load(tmp_path / "p" / "a.npy")
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, height, width)
    assert np.allclose(probabilities.sum(axis=0), 1, atol=5e-3)
    # The indexed class holds the highest probability (float16 may round a close pair to a tie).
    chosen = np.take_along_axis(probabilities, index[None].astype(np.int64), axis=0)[0]
    assert np.array_equal(chosen, probabilities.max(axis=0))


def test_out_dash_writes_png_bytes(checkpoint: Path, images: Path) -> None:
    streams = run(checkpoint, [str(images / "b.jpg")], options(None))
    assert streams.lines.getvalue() == ""
    with Image.open(io.BytesIO(streams.data.getvalue())) as mask:
        assert (mask.height, mask.width) == SIZES["b.jpg"]
    with pytest.raises(UsageError, match="one image"):
        run(checkpoint, [str(images)], options(None))


def test_existing_outputs_are_skipped_unless_overwrite(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(b"keep me")
    streams = run(checkpoint, [str(images)], options(tmp_path))
    assert streams.lines.getvalue() == f"{tmp_path / 'b.png'}\n"
    assert "a.png: exists; skipped" in streams.log.getvalue()
    assert (tmp_path / "a.png").read_bytes() == b"keep me"
    streams = run(checkpoint, [str(images)], options(tmp_path, overwrite=True))
    assert len(streams.lines.getvalue().splitlines()) == 2
    assert Image.open(tmp_path / "a.png").size == (51, 37)


def test_fail_fast_stops_at_the_first_bad_input(checkpoint: Path, images: Path, tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(RuntimeFailure, match=r"bad\.jpg.*fail-fast"):
        run(checkpoint, [str(bad), str(images)], options(tmp_path / "o", fail_fast=True))
    assert not list((tmp_path / "o").iterdir())


def test_stdin_folders_and_name_collisions(tmp_path: Path) -> None:
    (tmp_path / "x" / "deep").mkdir(parents=True)
    for name in ("x/one.png", "x/deep/two.v2.jpg", "x/skip.txt", "three.tif"):
        (tmp_path / name).touch()
    found = expand_inputs(["-"], io.StringIO(f"{tmp_path / 'x'}\n\n{tmp_path / 'three.tif'}\n"))
    assert [(str(p.relative_to(tmp_path)), str(n)) for p, n in found] == [
        ("x/deep/two.v2.jpg", "deep/two.v2"),
        ("x/one.png", "one"),
        ("three.tif", "three"),
    ]


def test_threshold_is_for_binary_models(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="binary"):
        run(checkpoint, [str(images)], options(tmp_path, threshold=0.3))
    info = CheckpointInfo(
        model={"arch": "unet", "backbone": "none", "in_channels": 3, "classes": 1, "options": {}},
        classes=ClassMapping("binary", ["background", "cell"]).to_dict(),
        input_size=(8, 8),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    probabilities = torch.tensor([[[0.2, 0.4, 0.6]]])
    logits = torch.log(probabilities / (1 - probabilities))
    low = OutputSpec.from_info(info, "index", threshold=0.3)
    high = OutputSpec.from_info(info, "index", threshold=0.5)
    data, counts = low.render(logits, None)
    assert counts == [1, 2]
    assert np.asarray(Image.open(io.BytesIO(data))).tolist() == [[0, 1, 1]]
    assert high.render(logits, None)[1] == [2, 1]


# --- model input size ------------------------------------------------------------------------


def test_native_size_batches_equal_sizes_and_matches_one_by_one(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Each image runs at its own size (no resize), images of one size share a batch, and the
    result equals running the model on that image alone."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    sizes = {"p.png": (40, 56), "q.png": (33, 47), "r.png": (40, 56), "s.png": (40, 56)}
    for name, (height, width) in sizes.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    model, info = load_model(checkpoint, CPU)
    together = options(tmp_path / "together", size="native", batch_size=4)
    predictor = Predictor(segmenter(model, info, together), together)
    paths = [folder / name for name in sizes]
    batches = [sorted(s.index for s in batch.samples) for batch in predictor.loader(paths)]
    assert batches == [[0, 2, 3], [1]]

    run(checkpoint, [str(folder)], together)
    run(checkpoint, [str(folder)], options(tmp_path / "alone", size="native", batch_size=1))
    for name, (height, width) in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "together" / name))
        assert mask.shape == (height, width)
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "alone" / name)))
        image = PredictDataset([folder / name], Preprocess(None, info.spec), False)[0][0]
        with torch.inference_mode():
            expected = model(image[None]).argmax(1)[0].numpy()
        assert np.array_equal(mask, expected)


def test_compiled_model_predicts_what_the_eager_one_does(images: Path, tmp_path: Path) -> None:
    """`--compile` must reach the model and give the eager masks at every input size. An
    FCN-32s on VGG11 with narrow fc layers: inductor's compile time grows with the number of
    ops, and this one compiles in about a third of the ResUNet18's time."""
    from segcli.models import build_model

    torch.manual_seed(0)
    model = build_model("fcn", "vgg11", classes=3, stride=32, fc_width=64)
    checkpoint = tmp_path / "fcn.safetensors"
    save_checkpoint(checkpoint, model, make_info(model, NAMES))
    run(checkpoint, [str(images)], options(tmp_path / "eager"))
    from torch._dynamo.utils import counters

    counters.clear()
    run(checkpoint, [str(images)], options(tmp_path / "compiled", compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced the model: the flag arrived
    for name in SIZES:
        stem = Path(name).stem
        eager = np.asarray(Image.open(tmp_path / "eager" / f"{stem}.png"))
        fast = np.asarray(Image.open(tmp_path / "compiled" / f"{stem}.png"))
        assert (eager == fast).mean() > 0.99  # fp32; fused kernels may flip a near-tie


def test_explicit_size_and_bad_size_flags(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    run(checkpoint, [str(images)], options(tmp_path / "s", size="96x80"))
    for name, size in SIZES.items():
        stem = Path(name).stem
        assert np.asarray(Image.open(tmp_path / "s" / f"{stem}.png")).shape == size
    with pytest.raises(UsageError, match="`size`"):
        run(checkpoint, [str(images)], options(tmp_path / "b", size="big"))
    with pytest.raises(UsageError, match="`tile`"):
        run(checkpoint, [str(images)], options(tmp_path / "t", size="native", tile=32))


# --- tiling and TTA ---------------------------------------------------------------------------


def test_window_starts_cover_the_image_and_end_at_the_border() -> None:
    assert window_starts(100, 64, 48) == [0, 36]
    assert window_starts(64, 64, 48) == [0]
    assert window_starts(50, 64, 48) == [0]
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]


def test_tiling_of_a_pointwise_model_equals_the_untiled_output() -> None:
    """With a 1x1 model every window sees what the whole image shows, so the blend must give
    back the untiled logits exactly: this checks the weighting and normalisation."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1).eval()
    image = torch.randn(3, 77, 131)
    with torch.inference_mode():
        whole = class_logits(model, image[None], precision=FP32, device=CPU)[0]
        tiled = sliding_window_logits(
            model, image, tile=32, overlap=0.25, precision=FP32, device=CPU, tta=True
        )
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_tiled_output_matches_untiled_within_border_tolerance(checkpoint: Path) -> None:
    model, _ = load_model(checkpoint)
    torch.manual_seed(0)
    image = torch.randn(3, 96, 80)
    with torch.inference_mode():
        whole = class_logits(model, image[None], precision=FP32, device=CPU)[0]
        one_window = sliding_window_logits(
            model, image, tile=128, overlap=0.25, precision=FP32, device=CPU
        )
        tiled = sliding_window_logits(
            model, image, tile=64, overlap=0.5, precision=FP32, device=CPU
        )
    assert torch.equal(one_window, whole)
    # The UNet sees less context in a window than in the whole image, so values differ, most
    # near window borders, where the Gaussian weights count least. Unnormalised or unweighted
    # blending is far off: see the pointwise test.
    assert (tiled.argmax(0) == whole.argmax(0)).float().mean() > 0.75


def test_a_window_the_model_size_gives_the_untiled_masks(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    # Windows slide over the image resized to the training size (64 here), so a 64-pixel tile
    # is the whole-image prediction: the same PNGs, byte for byte. Windows over native pixels
    # (what --tile did before) show objects at another scale and differ.
    run(checkpoint, [str(images)], options(tmp_path / "whole", tta=True))
    run(checkpoint, [str(images)], options(tmp_path / "tiled", tile=64, tta=True))
    for name in SIZES:
        stem = Path(name).stem
        whole = np.asarray(Image.open(tmp_path / "whole" / f"{stem}.png"))
        tiled = np.asarray(Image.open(tmp_path / "tiled" / f"{stem}.png"))
        assert np.array_equal(whole, tiled)


def recorder(model: torch.nn.Module) -> tuple[torch.nn.Module, list[tuple[int, int]]]:
    """`model` wrapped to record the H x W of every input it is fed, one entry per image."""
    seen: list[tuple[int, int]] = []

    class Recording(torch.nn.Module):
        size_divisor = model.size_divisor

        def forward(self, x):
            seen.extend([tuple(x.shape[-2:])] * len(x))
            return model(x)

    return Recording(), seen


def big_image(folder: Path) -> Path:
    """A 999 x 960 image, as from a retina camera."""
    source = folder / "big.png"
    Image.new("RGB", (960, 999), (30, 90, 150)).save(source)
    return source


def test_windows_are_cut_at_the_training_scale(checkpoint: Path, tmp_path: Path) -> None:
    # A recording model: a 999x960 image with a 64x64 model and --tile 32 must only feed
    # 32x32 windows cut from the 64x64 resized canvas (3 x 3 windows at overlap 0.25), never
    # native-resolution pixels.
    model, info = load_model(checkpoint)
    recording, seen = recorder(model)
    source = big_image(tmp_path)
    tiled = options(tmp_path / "o", tile=32)
    predictor = Predictor(segmenter(recording, info, tiled), tiled)
    (prediction,) = list(predictor.run([source]))
    assert set(seen) == {(32, 32)} and len(seen) == 9
    assert tuple(prediction.logits.shape[-2:]) == (999, 960)


def test_a_patch_model_slides_its_patch_size_at_its_scale(checkpoint: Path, tmp_path: Path) -> None:
    # A checkpoint trained on 64-pixel patches of images halved (--crop 64 --scale 0.5): with
    # no flag, a 999x960 image is resized to 500x480 and only 64x64 windows of it are fed
    # (ceil((500-64)/48)+1 = 11 by 10 at overlap 0.25); logits come back at 999x960.
    import dataclasses

    from segcli.infer.spec import InferenceSpec

    model, info = load_model(checkpoint)
    spec = dataclasses.replace(info.spec, policy="patches", size=(64, 64), scale=0.5)
    info = dataclasses.replace(info, inference=InferenceSpec.to_dict(spec))
    recording, seen = recorder(model)
    source = big_image(tmp_path)
    plain = options(tmp_path / "o")
    patches = segmenter(recording, info, plain)
    assert patches.tile == 64 and patches.size is None and not patches.off_scale
    assert tuple(patches.preprocess(read_image(source)).shape[-2:]) == (500, 480)
    (prediction,) = list(Predictor(patches, plain).run([source]))
    assert set(seen) == {(64, 64)} and len(seen) == 11 * 10
    assert tuple(prediction.logits.shape[-2:]) == (999, 960)


def test_tiles_smaller_than_the_model_stride_are_refused(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="`tile` 16 is smaller than the model's stride"):
        run(checkpoint, [str(images)], options(tmp_path / "o", tile=16))


def test_off_scale_sizes_warn_once(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    streams = run(checkpoint, [str(images)], options(tmp_path / "o", size="96x80"))
    warnings = [line for line in streams.log.getvalue().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--size" in warnings[0] and "64x64" in warnings[0]
    quiet = run(checkpoint, [str(images)], options(tmp_path / "q"))
    assert "warning" not in quiet.log.getvalue()


def test_cli_tiled_output_has_the_exact_input_size(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    source = tmp_path / "odd.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (101, 75), dtype=np.uint8)).save(source)  # gray input
    run(checkpoint, [str(source)], options(tmp_path / "o", tile=32, tta=True, batch_size=3))
    with Image.open(tmp_path / "o" / "odd.png") as mask:
        assert (mask.height, mask.width) == (101, 75)


def test_tta_of_a_flip_invariant_model_changes_nothing() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 1).eval()
    batch = torch.randn(2, 3, 20, 30)
    with torch.inference_mode():
        plain = class_logits(model, batch, precision=FP32, device=CPU)
        flipped = class_logits(model, batch, precision=FP32, device=CPU, tta=True)
    assert torch.allclose(plain, flipped, atol=1e-6)


BIG_IMAGE_SCRIPT = textwrap.dedent(
    """
    import io, json, resource, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from segcli.checkpoint import CheckpointInfo
    from segcli.device import Precision
    from segcli.cli.output import Job, PredictionWriter, Streams, Summary
    from segcli.infer.predict import PredictOptions, Predictor
    from segcli.infer.segmenter import Segmenter

    torch.set_num_threads(2)
    folder = Path(sys.argv[1])
    Image.new("RGB", (2000, 1500), (90, 120, 60)).save(folder / "big.png")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1),
    ).eval()
    info = CheckpointInfo(
        model={"arch": "tiny", "backbone": "none", "in_channels": 3, "classes": 3},
        classes={"kind": "index", "names": ["a", "b", "c"]},
        input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3,
    )
    options = PredictOptions(out=folder / "out", tile=256, workers=0, amp="off")
    lines = io.StringIO()
    segmenter = Segmenter(
        model, info, device=torch.device("cpu"), precision=Precision(None, False),
        **options.segmenter_options(),
    )
    predictor = Predictor(segmenter, options)
    writer = PredictionWriter(segmenter, options, Streams(lines=lines, log=sys.stderr))
    # A small image first: the first run's one-off allocations (oneDNN kernels, thread pools,
    # libpng) are not per-image memory.
    Image.new("RGB", (300, 200)).save(folder / "small.png")
    small = Job(folder / "small.png", folder / "out" / "small.png")
    writer.write_all(predictor, [small], Summary())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    writer.write_all(predictor, [Job(folder / "big.png", folder / "out" / "big.png")], Summary())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = Image.open(folder / "out" / "big.png").size
    print(json.dumps({"peak_increase_mb": (after - before) / 1024, "size": size}))
    """
)


def test_a_2000x1500_image_in_bounded_memory(tmp_path: Path) -> None:
    """Peak memory of a tiled run on a large image, decoding included. The model runs at its
    training scale (64x64 here), so only the decoded image, the logits restored to 2000x1500
    and the labels scale with the input (~60 MB); running the 8-channel model at native
    resolution would hold 2000x1500x8 float32 activations of 96 MB each."""
    result = subprocess.run(
        [sys.executable, "-c", BIG_IMAGE_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["size"] == [2000, 1500]
    assert report["peak_increase_mb"] < 200, report


# --- ONNX stand-in ----------------------------------------------------------------------------


def test_onnx_file_stands_in_for_the_checkpoint(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, info = load_model(checkpoint)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 64, 64),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
        dynamo=False,
    )
    graph = onnx.load(str(path))
    graph.metadata_props.add(key="segcli", value=info.to_json())
    onnx.save(graph, str(path))

    eager = run(checkpoint, [str(images)], options(tmp_path / "eager", format="prob"))
    exported = run(path, [str(images)], options(tmp_path / "onnx", format="prob"))
    assert exported.lines.getvalue() == eager.lines.getvalue().replace("eager", "onnx")
    for name in ("a.npy", "b.npy"):
        np.testing.assert_allclose(
            np.load(tmp_path / "onnx" / name), np.load(tmp_path / "eager" / name), atol=2e-3
        )
    with pytest.raises(UsageError, match="`compile`"):
        run(path, [str(images)], options(tmp_path / "c", compile=True))


def test_onnx_without_onnxruntime_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segcli.infer.onnx_model import load_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(UsageError, match=r"pip install 'segcli\[onnx\]'"):
        load_onnx(tmp_path / "model.onnx")
