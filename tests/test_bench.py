"""seg bench: valid JSON from a tiny run, the variant matrix, and one-line usage errors."""

from __future__ import annotations

import json
import time

import pytest

from segcli import bench as bench_engine
from segcli.errors import UsageError

TINY = bench_engine.BenchSpec(
    arch="unet", backbone="resnet18", size=(32, 32), device="cpu", iters=2, warmup=1, classes=3
)


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench_engine.percentile(values, 50) == pytest.approx(50.5)
    assert bench_engine.percentile(values, 99) == pytest.approx(99.01)


def test_cli_json(seg) -> None:
    done = seg(
        "bench", "unet", "--backbone", "resnet18", "--size", "64", "--iters", "2",
        "--warmup", "1", "--device", "cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (result,) = report["results"]
    assert report["size"] == [64, 64] and result["variant"] == "eager fp32 NCHW"
    assert result["images_per_s"] > 0 and result["gflops_per_image"] > 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["peak_memory_mb"] > 0
    # Catches a FLOP count, achieved rate or peak fraction computed from the wrong terms: the
    # count must equal every convolution's multiply-adds counted here by hooks, independently
    # of the FLOP counter the bench uses, and the fraction the achieved over the measured peak.
    import torch

    from segcli.models import build_model

    model = build_model("unet", "resnet18", 3, report["classes"]).eval()
    flops = 0

    def count(module, inputs, output) -> None:
        nonlocal flops
        kernel = module.kernel_size[0] * module.kernel_size[1]
        flops += 2 * output.numel() * (module.in_channels // module.groups) * kernel

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    assert result["gflops_per_image"] == pytest.approx(flops / 1e9, rel=1e-6)
    achieved = result["gflops_per_image"] * result["images_per_s"]
    assert result["achieved_gflops"] == pytest.approx(achieved, rel=1e-9)
    fraction = result["achieved_gflops"] / result["matmul_peak_gflops"]
    assert result["peak_fraction"] == pytest.approx(fraction, rel=1e-9)
    assert 0 < result["peak_fraction"] < 1.5


def test_dense_peak_times_slow_products_twice_and_keeps_the_fastest_run() -> None:
    # Catches a peak measurement that runs a fixed ten products whatever they cost (40 s of
    # emulated bf16 GEMMs per `seg bench --dtype bf16` on an AVX2-only CPU) and one that
    # reports the mean or the last run instead of the fastest.
    calls = 0

    def slow() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.3)

    assert bench_engine.fastest_run(slow, lambda: None, budget_s=0.5) >= 0.3
    assert calls == 3  # one warm-up, then two timed runs
    calls = 0
    assert bench_engine.fastest_run(slow, lambda: None, budget_s=0.25) >= 0.3
    assert calls == 2  # a warm-up over the budget is the first timed run

    durations = iter([0.0, 0.03, 0.002, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03])
    calls = 0

    def quick() -> None:
        nonlocal calls
        calls += 1
        time.sleep(next(durations))

    assert bench_engine.fastest_run(quick, lambda: None, budget_s=0.5) < 0.02
    assert calls == 9  # one warm-up and the eight runs that fit in the budget


def test_variant_matrix_compares_with_eager_fp32() -> None:
    variants = [
        bench_engine.Variant(),
        bench_engine.Variant(channels_last=True),
        bench_engine.Variant("bf16", channels_last=True),
        bench_engine.Variant(onnx=True),
    ]
    report = bench_engine.run_bench(TINY, variants)
    results = {r["variant"]: r for r in report["results"]}
    speeds = [r["images_per_s"] for r in report["results"]]
    assert speeds == sorted(speeds, reverse=True)
    assert results["eager fp32 NCHW"]["max_abs_diff"] == 0
    assert results["eager fp32 channels_last"]["max_abs_diff"] < 1e-3
    assert results["onnxruntime fp32"]["max_abs_diff"] < 1e-3
    assert results["eager bf16 channels_last"]["argmax_agreement"] > 0.5


def test_train_mode() -> None:
    spec = bench_engine.BenchSpec(**{**TINY.__dict__, "mode": "train", "batch_size": 2})
    (result,) = run = bench_engine.run_bench(spec, [bench_engine.Variant()])["results"]
    assert run and result["images_per_s"] > 0 and result["max_abs_diff"] is None


@pytest.mark.parametrize("native_bf16", [True, False])
def test_compare_matrix_lists_every_variant(monkeypatch, tmp_path, native_bf16: bool) -> None:
    # On a CPU without native bf16 the emulated variants are skipped unless asked for (they
    # took over half of --compare's time on an AVX2-only EPYC) and flagged when shown.
    import torch

    from segcli import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(device_module, "measure_bf16_speedup", lambda purpose: 1.5)
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    names = [v.name for v in bench_engine.compare_matrix("infer", cpu)]
    assert names[0] == "eager fp32 NCHW"
    assert {"eager fp32 channels_last", "onnxruntime fp32"} <= set(names)
    assert ("compile bf16 channels_last" in names) is native_bf16
    everything = bench_engine.compare_matrix("infer", cpu, include_emulated=True)
    assert "compile bf16 channels_last" in [v.name for v in everything]
    emulated = [v.name for v in everything if bench_engine.is_emulated(v, cpu)]
    assert emulated == (
        [] if native_bf16 else ["eager bf16 channels_last", "compile bf16 channels_last"]
    )
    # What seg predict uses here: bf16 + channels_last where native bf16 measured faster, else
    # fp32 channels_last.
    default = bench_engine._segcli_default(cpu)
    assert default == bench_engine.Variant("bf16" if native_bf16 else "fp32", channels_last=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "fp16"], "fp16"),
        (["--onnx", "--mode", "train"], "--onnx"),
        (["--dtype", "int8"], "int8"),
        (["--compare", "--compile"], "--compare"),
    ],
)
def test_usage_errors_are_one_line(seg, flags: list[str], message: str) -> None:
    done = seg("bench", "unet", "--device", "cpu", "--size", "32", *flags)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_bad_spec_raises_before_work() -> None:
    spec = bench_engine.BenchSpec(**{**TINY.__dict__, "mode": "serve"})
    with pytest.raises(UsageError, match="`mode`"):
        bench_engine.run_bench(spec, [bench_engine.Variant()])


def test_train_mode_times_batch_2_for_models_that_need_it() -> None:
    # `seg bench deeplabv3 --mode train` (default batch 1) ended in a BatchNorm traceback.
    spec = bench_engine.BenchSpec(
        arch="deeplabv3", backbone="resnet18", size=(32, 32), device="cpu", iters=1, warmup=0,
        classes=3, mode="train",
    )  # fmt: skip
    lines: list[str] = []
    report = bench_engine.run_bench(spec, [bench_engine.Variant()], log=lines.append)
    assert report["batch_size"] == 2
    assert any("at least 2" in line for line in lines)


def test_end_to_end_mode_times_decoding_to_label_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against end-to-end timing only the model: every timed step decodes each PNG file
    of the batch (counted here), and its ONNX variant runs through the same Segmenter."""
    import segcli.data

    decoded: list[str] = []
    read_image = segcli.data.read_image

    def counting_read(path):
        decoded.append(str(path))
        return read_image(path)

    monkeypatch.setattr(segcli.data, "read_image", counting_read)
    spec = bench_engine.BenchSpec(
        **{**TINY.__dict__, "batch_size": 2, "iters": 3, "warmup": 1, "mode": "end-to-end"}
    )
    variants = [bench_engine.Variant(), bench_engine.Variant(onnx=True)]
    report = bench_engine.run_bench(spec, variants)
    results = {r["variant"]: r for r in report["results"]}
    assert report["mode"] == "end-to-end"
    assert len(decoded) == 2 * 2 * (3 + 1)  # two variants, batch 2, timed and warm-up steps
    assert all(path.endswith(".png") for path in decoded)
    assert results["onnxruntime fp32"]["max_abs_diff"] < 1e-3


def test_bench_model_predicts_more_than_one_class() -> None:
    # Catches random bench weights whose argmax is one class everywhere (ResNets start each
    # residual branch at a zero BatchNorm scale), which makes every variant's argmax agreement
    # a trivial 100% and hides a reduced precision that changes the masks.
    import torch

    spec = bench_engine.BenchSpec(arch="deeplabv3", backbone="resnet50", size=(64, 64), classes=21)
    model, _ = bench_engine.build_bench_model(spec)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        labels = model(images).argmax(1)
    assert labels.unique().numel() >= 4
    assert labels.flatten().bincount().max() < 0.8 * labels.numel()
