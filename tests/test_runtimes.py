"""`--runtime torch|onnxruntime|openvino|auto` for seg predict and seg eval: the same masks and
scores on every runtime, an export made once per checkpoint and runtime, a measured `auto`,
and one-line errors for what cannot run."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

import segcli.infer.runtimes as runtimes
from tests.helpers import write_mock_checkpoint

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def checkpoint(tmp_path):
    return write_mock_checkpoint(tmp_path / "run" / "best.safetensors")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 255, (40 + 7 * index, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index}.png")
    return folder


def masks(folder):
    return {path.name: np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))}


def agreement(first: dict, second: dict) -> float:
    assert first.keys() == second.keys() and first
    return float(np.mean([np.mean(first[name] == second[name]) for name in first]))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtimes_write_the_masks_torch_writes(seg, checkpoint, images, tmp_path, runtime):
    # Catches an exported runtime fed differently from torch (no normalisation, RGB order,
    # resized to another size) or its logits misread (wrong output, transposed): the masks of
    # an fp32 export agree with torch's fp32 ones on all but rounding-tied pixels (`--amp off`:
    # on a CPU with native bf16, torch's default is bf16).
    if runtime == "openvino":
        pytest.importorskip("openvino")
    base = seg("predict", str(checkpoint), str(images), "--out", str(tmp_path / "torch"),
               "--runtime", "torch", "--amp", "off")  # fmt: skip
    assert base.returncode == 0, base.stderr
    result = seg("predict", str(checkpoint), str(images), "--out", str(tmp_path / runtime),
                 "--runtime", runtime)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert agreement(masks(tmp_path / "torch"), masks(tmp_path / runtime)) >= 0.999
    exports = list((checkpoint.parent / "cache").glob(f"best-*-dynamic-{runtime}-*.onnx"))
    assert len(exports) == 1
    # The exported graph keeps the checkpoint's stride: windows below it are still refused.
    tiny = seg("predict", str(checkpoint), str(images), "--out", str(tmp_path / "t"),
               "--runtime", runtime, "--tile", "16")  # fmt: skip
    assert tiny.returncode == 2 and "stride" in tiny.stderr


def test_the_export_is_made_once_and_a_new_checkpoint_gets_its_own(
    seg, checkpoint, images, tmp_path, monkeypatch
):
    # Catches a cache that exports on every call (seconds per call for a big model), or one
    # keyed by the file name alone, which would run a retrained checkpoint's stale export.
    args = ["predict", str(checkpoint), str(images), "--runtime", "onnxruntime", "--overwrite"]
    assert seg(*args, "--out", str(tmp_path / "a")).returncode == 0
    import segcli.export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(segcli.export, "export_model", no_export)
    again = seg(*args, "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    monkeypatch.undo()
    write_mock_checkpoint(checkpoint, seed=1)  # retrained: other weights, same name
    retrained = seg(*args, "--out", str(tmp_path / "c"))
    assert retrained.returncode == 0, retrained.stderr
    assert len(list((checkpoint.parent / "cache").glob("best-*-onnxruntime-*.onnx"))) == 2
    assert agreement(masks(tmp_path / "a"), masks(tmp_path / "c")) < 0.99


def test_auto_measures_once_per_cpu_kind_and_says_which(seg, checkpoint, images, tmp_path,
                                                        monkeypatch):  # fmt: skip
    # Catches auto timing the runtimes on every call, picking one it did not find fastest,
    # or choosing silently. The host is one without native bf16, where `--amp auto` is fp32
    # and the runtimes compete (on bf16 hosts auto keeps torch, tested below).
    import segcli.device

    monkeypatch.setattr(segcli.device, "cpu_has_native_bf16", lambda: False)
    timings = {"torch": 3.0, "onnxruntime": 1.0, "openvino": 2.0}
    monkeypatch.setattr(runtimes, "_time_forward", lambda run, example: timings[_name(run)])
    first = seg("predict", str(checkpoint), str(images), "--out", str(tmp_path / "a"),
                "--runtime", "auto")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "runtime onnxruntime" in first.stderr and "3.00x torch" in first.stderr
    (record,) = (checkpoint.parent / "cache").glob("best-*-runtime.json")
    assert json.loads(record.read_text())["runtime"] == "onnxruntime"

    def no_timing(run, example):
        raise AssertionError("measured again")

    monkeypatch.setattr(runtimes, "_time_forward", no_timing)
    second = seg("eval", str(checkpoint), "--runtime", "auto", "--json", "--batch-size", "4")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["runtime"] == "onnxruntime"
    assert "measured earlier" in second.stderr


def _name(run) -> str:
    return getattr(run, "runtime", "torch")


def test_auto_keeps_torch_where_the_exports_would_change_the_numbers(seg, tmp_path, monkeypatch):
    # Catches auto sending an ensemble (the export holds one member) or a reduced-precision
    # run (the exports compute in float32) to another runtime.
    def fail(*args, **kwargs):
        raise AssertionError("auto measured a case it must decide without measuring")

    monkeypatch.setattr(runtimes, "_measured_choice", fail)
    members = [
        write_mock_checkpoint(tmp_path / f"m{seed}/best.safetensors", seed) for seed in (0, 1)
    ]
    ensemble = seg("eval", *map(str, members), "--runtime", "auto", "--json")
    assert ensemble.returncode == 0, ensemble.stderr
    assert json.loads(ensemble.stdout)["runtime"] == "torch"
    reduced = seg("eval", str(members[0]), "--runtime", "auto", "--amp", "bf16", "--json")
    assert reduced.returncode == 0, reduced.stderr
    assert json.loads(reduced.stdout)["runtime"] == "torch"


def test_eval_scores_the_same_on_onnxruntime_as_on_torch(seg, checkpoint):
    # Catches eval's own loop feeding the exported model differently from predict's.
    scores = {}
    for runtime in ("torch", "onnxruntime"):
        result = seg("eval", str(checkpoint), "--runtime", runtime, "--json")
        assert result.returncode == 0, result.stderr
        scores[runtime] = json.loads(result.stdout)
    assert scores["onnxruntime"]["runtime"] == "onnxruntime"
    assert scores["onnxruntime"]["miou"] == pytest.approx(scores["torch"]["miou"], abs=1e-3)


def test_runtimes_that_cannot_run_are_one_line_and_exit_2(seg, checkpoint, images, tmp_path,
                                                          monkeypatch):  # fmt: skip
    # Catches a missing extra surfacing as an ImportError traceback, an unknown runtime
    # falling back silently, and an ensemble half-exported.
    out = tmp_path / "out"
    other = write_mock_checkpoint(tmp_path / "other" / "best.safetensors", seed=1)
    cases = {
        ("tensorrt",): "tensorrt",
        ("onnxruntime", str(other)): "ensemble",
    }
    for (runtime, *more), fragment in cases.items():
        result = seg("predict", str(checkpoint), *more, str(images), "--out", str(out),
                     "--runtime", runtime)  # fmt: skip
        assert result.returncode == 2, (runtime, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr
        assert "--runtime" in result.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    missing = seg("predict", str(checkpoint), str(images), "--out", str(out), "--runtime",
                  "openvino")  # fmt: skip
    assert missing.returncode == 2
    assert "segcli[openvino]" in missing.stderr and "--runtime" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not out.exists()
