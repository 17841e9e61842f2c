"""Measured speed: a timing loop with warm-up and device synchronisation, latency percentiles,
peak memory, FLOP accounting against the device's matmul peak (measured here, not looked up),
and a matrix of variants (memory format, autocast dtype, torch.compile, ONNX Runtime) compared
with eager fp32 on the same input."""

from __future__ import annotations

import copy
import functools
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcli.device import Precision, compiled, resolve_precision
from segcli.errors import UsageError, choose

if TYPE_CHECKING:
    from segcli.checkpoint import CheckpointInfo

# infer: the model run exactly as seg predict calls it (`Segmenter.logits` on a normalised
# batch); end-to-end: decode PNG files to label maps (`Segmenter.predict_batch`); train: a step.
MODES = ("infer", "end-to-end", "train")
DTYPES = ("fp32", "bf16", "fp16")
AMP_NAME = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
DTYPE_NAME = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Training a forward + backward costs about 3 forwards (two matmuls per forward one).
TRAIN_FLOP_FACTOR = 3


@dataclass(frozen=True)
class Variant:
    """One way of running the model."""

    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    onnx: bool = False

    @property
    def name(self) -> str:
        if self.onnx:
            return "onnxruntime fp32"
        parts = ["compile"] if self.compile else ["eager"]
        parts.append(self.dtype)
        parts.append("channels_last" if self.channels_last else "NCHW")
        return " ".join(parts)


@dataclass
class BenchSpec:
    arch: str
    backbone: str | None = None
    size: tuple[int, int] = (512, 512)
    batch_size: int = 1
    mode: str = "infer"
    device: str = "auto"
    classes: int = 21
    in_channels: int = 3
    iters: int = 10
    warmup: int = 2
    seed: int = 0


@dataclass
class BenchResult:
    variant: str
    dtype: str
    channels_last: bool
    compile: bool
    onnx: bool
    images_per_s: float
    latency_ms: dict[str, float]
    setup_s: float  # first call (compilation, ONNX export) beyond a steady-state one
    peak_memory_mb: float
    memory_kind: str
    gflops_per_image: float
    achieved_gflops: float
    matmul_peak_gflops: float
    peak_fraction: float
    max_abs_diff: float | None = None  # against eager fp32 on the same input (infer only)
    argmax_agreement: float | None = None
    speedup: float | None = None  # images/s over eager fp32 in the same run
    default: bool = False  # what seg predict/eval use on this device
    emulated: bool = False  # a precision this CPU has no native instructions for
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def time_steps(
    step: Callable[[], object], iters: int, warmup: int, sync: Callable[[], None]
) -> tuple[list[float], float]:
    """Run `warmup` untimed steps, then `iters` timed ones. Returns per-step seconds and the
    first warm-up step's seconds (where compilation and allocator growth happen)."""
    first = 0.0
    for index in range(warmup):
        seconds = timed(step, sync)
        if index == 0:
            first = seconds
    return [timed(step, sync) for _ in range(iters)], first


def timed(step: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one `step` with its queued device work."""
    started = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - started


class PeakMemory:
    """CUDA: max allocated by the caching allocator. CPU: the process's peak resident set,
    reset at `start` through /proc/self/clear_refs where Linux allows it (else the peak since
    the process started, which can only over-report)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max allocated" if device.type == "cuda" else "process peak RSS"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "process peak RSS since start"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# Timed seconds per product at most (beyond two runs) when measuring the dense peak.
PEAK_BUDGET_S = 0.5


@functools.cache
def matmul_peak_gflops(device_name: str, dtype_name: str) -> float:
    """Best GFLOP/s of large dense products on this device and dtype: the practical ceiling the
    model's achieved GFLOP/s is compared with. Timed three ways and the fastest counts: a GEMM
    as `torch.mm` (the BLAS library), the same GEMM as a 1x1 channels_last convolution and a
    256-channel 3x3 convolution (oneDNN on CPU, cuDNN on CUDA). On AMD CPUs MKL's fp32 GEMM
    reaches well under half of what oneDNN's convolutions do, which would otherwise put
    convolutional models above "100%"."""
    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    n = 2048 if device.type == "cuda" else 1024

    def tensor(*shape: int, channels_last: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, device=device).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    a, b = tensor(n, n), tensor(n, n)
    pixels, channels = 64, 256  # 1x1: M = 64 * 64 rows; 3x3: 256 channels at 2 * pixels
    x1 = tensor(1, n, pixels, pixels, channels_last=True)
    w1 = tensor(n, n, 1, 1, channels_last=True)
    x3 = tensor(1, channels, 2 * pixels, 2 * pixels, channels_last=True)
    w3 = tensor(channels, channels, 3, 3, channels_last=True)
    sync = synchronizer(device)
    best = 0.0
    for product, flops in (
        (lambda: torch.mm(a, b), 2 * n**3),
        (lambda: F.conv2d(x1, w1), 2 * pixels**2 * n * n),
        (lambda: F.conv2d(x3, w3, padding=1), 2 * (2 * pixels) ** 2 * channels**2 * 9),
    ):
        best = max(best, flops / fastest_run(product, sync) / 1e9)
    return best


def fastest_run(
    product: Callable[[], object],
    sync: Callable[[], None],
    budget_s: float = PEAK_BUDGET_S,
    most: int = 8,
) -> float:
    """Seconds of the fastest of up to `most` timed runs after one warm-up, stopping once at
    least two were timed and they took `budget_s` (a warm-up that alone took `budget_s` counts
    as the first run). bf16 on a CPU without AVX512-BF16 is emulated (about 2.3 s per 1024^3
    GEMM on AVX2 kernels): timed twice instead of ten times, its peak took 10 s instead of the
    42 s it added to every `seg bench --dtype bf16` there."""
    first = timed(product, sync)
    # A product that slow is its own warm-up: allocation and dispatch are lost in its time.
    times = [first] if first >= budget_s else []
    while len(times) < most and (len(times) < 2 or sum(times) < budget_s):
        times.append(timed(product, sync))
    return min(times)


def _precision(variant: Variant, device: torch.device) -> Precision:
    return resolve_precision(AMP_NAME[variant.dtype], device, variant.channels_last)


def _segcli_default(device: torch.device) -> Variant:
    """The precision seg predict and seg eval pick by default (`--amp auto`)."""
    precision = resolve_precision("auto", device)
    return Variant(DTYPE_NAME[precision.dtype], precision.channels_last)


def is_emulated(variant: Variant, device: torch.device) -> bool:
    """bf16 on a CPU without AVX512-BF16/AMX runs through conversions, several times slower
    than fp32 (0.14x on an AVX2-only EPYC for DeepLabv3-ResNet50)."""
    from segcli.device import cpu_has_native_bf16

    return device.type == "cpu" and variant.dtype == "bf16" and not cpu_has_native_bf16()


def compare_matrix(
    mode: str, device: torch.device, include_emulated: bool = False
) -> list[Variant]:
    """Eager fp32 first (the reference), then channels_last, autocast, compile and ONNX.
    Precisions the CPU only emulates are left out unless `include_emulated`: on an AVX2-only
    host they took over half of `--compare`'s time to show what is never worth using."""
    fast = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    variants = [
        Variant(),
        Variant(channels_last=True),
        Variant(fast, channels_last=True),
        Variant(fast, channels_last=True, compile=True),
    ]
    if not include_emulated:
        variants = [v for v in variants if not is_emulated(v, device)]
    if mode == "infer" and device.type == "cpu":
        from segcli.export import onnx_available, onnxruntime_available

        if onnx_available() and onnxruntime_available():
            variants.append(Variant(onnx=True))
    default = _segcli_default(device)
    if default not in variants:
        variants.insert(1, default)
    return variants


def _check_variant(variant: Variant, mode: str, device: torch.device) -> None:
    choose("`dtype`", variant.dtype, DTYPES)
    if variant.onnx:
        from segcli.export import onnx_available, onnxruntime_available

        if mode == "train" or device.type != "cpu":
            raise UsageError(
                "`onnx` benchmarks inference on CPU (`mode` infer or end-to-end, `device` cpu)"
            )
        if variant.dtype != "fp32" or variant.compile or variant.channels_last:
            raise UsageError(
                "`onnx` runs the fp32 ONNX graph; drop `dtype`/`compile`/`channels_last`"
            )
        if not (onnx_available() and onnxruntime_available()):
            raise UsageError("`onnx` needs onnx and onnxruntime: pip install 'segcli[onnx]'")


def bench_info(model: nn.Module, spec: BenchSpec) -> CheckpointInfo:
    """What a checkpoint of this model trained at the benchmark's size would carry."""
    from segcli.checkpoint import CheckpointInfo, model_build_config
    from segcli.data import default_normalization

    mean, std = default_normalization(spec.in_channels)
    return CheckpointInfo(
        model=model_build_config(model),
        classes={"names": [str(i) for i in range(max(spec.classes, 2))]},
        input_size=spec.size,
        mean=mean,
        std=std,
    )


def _onnx_runner(
    model: nn.Module, images: torch.Tensor, spec: BenchSpec, folder: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Export at the benchmark's exact shape (static shapes let ONNX Runtime plan memory and
    fuse more) and run the file with onnxruntime."""
    from segcli.export import load_exported, traceable, write_onnx

    info = bench_info(model, spec)
    path = os.path.join(folder, "model.onnx")
    with torch.no_grad(), traceable(model.cpu().float().eval()) as friendly:
        write_onnx(friendly, info, images.cpu(), path, dynamic=False)
    return load_exported(path, "onnx")


def _prepare(
    base: nn.Module, variant: Variant, spec: BenchSpec, device: torch.device
) -> tuple[nn.Module, Precision]:
    model = copy.deepcopy(base).to(device)
    precision = _precision(variant, device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train(spec.mode == "train")
    if variant.compile:
        model = compiled(model)
    return model, precision


def run_variant(
    base: nn.Module,
    variant: Variant,
    spec: BenchSpec,
    device: torch.device,
    images: torch.Tensor,
    gflops_per_image: float,
    folder: str,
) -> tuple[BenchResult, torch.Tensor | None]:
    """Time one variant; returns its result and (infer) its fp32 logits on `images`."""
    _check_variant(variant, spec.mode, device)
    sync = synchronizer(device)
    memory = PeakMemory(device)
    memory.start()
    output: torch.Tensor | None = None
    setup = 0.0
    if variant.onnx:
        started = time.perf_counter()
        model: Any = _onnx_runner(base, images, spec, folder)
        setup = time.perf_counter() - started
        precision = Precision(None, channels_last=False)
        peak_dtype = "fp32"
    else:
        model, precision = _prepare(base, variant, spec, device)
        peak_dtype = variant.dtype
    if spec.mode == "train":
        x = images.to(device)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step = _train_step(model, precision, device, x, spec)
    else:
        from segcli.infer.segmenter import Segmenter

        segmenter = Segmenter(model, bench_info(base, spec), device=device, precision=precision)

        def run_logits() -> torch.Tensor:
            with torch.inference_mode():
                return segmenter.logits(images)

        step = run_logits
        if spec.mode == "end-to-end":
            files = _write_pngs(images, folder)
            step = lambda: segmenter.predict_batch(files)  # noqa: E731
    times, first = time_steps(step, spec.iters, max(spec.warmup, 1), sync)
    if spec.mode != "train":
        output = run_logits().cpu()
    setup += max(first - percentile(times, 50), 0.0)
    images_per_s = spec.batch_size * len(times) / sum(times)
    flops_factor = TRAIN_FLOP_FACTOR if spec.mode == "train" else 1
    achieved = gflops_per_image * flops_factor * images_per_s
    peak = matmul_peak_gflops(str(device), peak_dtype)
    result = BenchResult(
        variant=variant.name,
        dtype=variant.dtype,
        channels_last=variant.channels_last,
        compile=variant.compile,
        onnx=variant.onnx,
        images_per_s=images_per_s,
        latency_ms={f"p{q}": percentile(times, q) * 1e3 for q in (50, 90, 99)},
        setup_s=setup,
        peak_memory_mb=memory.peak_mb(),
        memory_kind=memory.kind,
        gflops_per_image=gflops_per_image,
        achieved_gflops=achieved,
        matmul_peak_gflops=peak,
        peak_fraction=achieved / peak,
        default=not variant.onnx and variant == _segcli_default(device) and not variant.compile,
        emulated=is_emulated(variant, device),
    )
    return result, output


def _write_pngs(images: torch.Tensor, folder: str) -> list[Path]:
    """The benchmark batch as 8-bit PNG files, for the end-to-end mode to decode."""
    from PIL import Image

    paths = []
    pixels = (images.clamp(-2, 2) * 63 + 128).round().to(torch.uint8)
    for index, image in enumerate(pixels):
        array = image.permute(1, 2, 0).numpy()
        path = Path(folder) / f"image_{index}.png"
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array[..., :3]).save(path)
        paths.append(path)
    return paths


def _train_step(
    model: nn.Module, precision: Precision, device: torch.device, x: torch.Tensor, spec: BenchSpec
) -> Callable[[], object]:
    """A bare training step: forward, cross-entropy (BCE for one class), backward, SGD step.
    Auxiliary outputs are left out: this is the floor `seg train` is measured against."""
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.classes == 1:
        target = torch.randint(0, 2, (spec.batch_size, 1, *spec.size), generator=generator)
        target = target.float().to(device)
    else:
        target = torch.randint(0, spec.classes, (spec.batch_size, *spec.size), generator=generator)
        target = target.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            out = model(x)
            logits = (out["out"] if isinstance(out, dict) else out).float()
            if spec.classes == 1:
                loss = F.binary_cross_entropy_with_logits(logits, target)
            else:
                loss = F.cross_entropy(logits, target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step


@torch.no_grad()
def randomise_batchnorm(model: nn.Module) -> None:
    """BatchNorm as training leaves it: running statistics and scales away from their initial
    values, so eval mode exercises them. The scales matter most: segcli's ResNets start every
    residual branch switched off (a zero scale), and with those a random network predicts one
    class everywhere, which would make every argmax agreement a trivial 100%."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            if module.weight is not None:
                module.weight.uniform_(0.5, 1.5)


def build_bench_model(spec: BenchSpec) -> tuple[nn.Module, float]:
    """The model with seeded random weights and non-trivial BatchNorm statistics (so eval mode
    exercises them), and its forward GFLOPs per image, counted on the meta device."""
    from segcli.models import build_model
    from segcli.models.summary import build_on_meta, forward_gflops

    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, spec.backbone, spec.in_channels, spec.classes)
    randomise_batchnorm(model)
    meta = build_on_meta(spec.arch, spec.backbone, spec.in_channels, spec.classes)
    return model.eval(), forward_gflops(meta, spec.in_channels, spec.size)


def run_bench(
    spec: BenchSpec,
    variants: list[Variant],
    log: Callable[[str], None] = lambda _: None,
    model: tuple[nn.Module, float] | None = None,
) -> dict[str, object]:
    """Time every variant on one seeded input batch; the first variant is the reference that
    speed-ups and differences are measured against. Results come back fastest first."""
    from segcli.device import resolve_device

    if spec.iters < 1 or spec.warmup < 0 or spec.batch_size < 1:
        raise UsageError("`iters` and `batch_size` must be at least 1, `warmup` at least 0")
    choose("`mode`", spec.mode, MODES)
    device = resolve_device(spec.device)
    for variant in variants:
        _check_variant(variant, spec.mode, device)
        _precision(variant, device)  # rejects fp16 on CPU before any work
    base, gflops = model or build_bench_model(spec)
    smallest = getattr(base, "min_train_batch", 1)
    if spec.mode == "train" and spec.batch_size < smallest:
        log(
            f"bench: {spec.arch} trains on batches of at least {smallest} (BatchNorm after "
            f"global pooling); timing `batch_size` {smallest}"
        )
        spec = replace(spec, batch_size=smallest)
    generator = torch.Generator().manual_seed(spec.seed)
    images = torch.randn(spec.batch_size, spec.in_channels, *spec.size, generator=generator)
    results: list[BenchResult] = []
    reference: torch.Tensor | None = None
    with tempfile.TemporaryDirectory(prefix="seg-bench-") as folder:
        for variant in variants:
            log(f"bench: {variant.name} ...")
            result, output = run_variant(base, variant, spec, device, images, gflops, folder)
            if output is not None:
                if reference is None:
                    reference = output
                result.max_abs_diff = float((output - reference).abs().max())
                if reference.shape[1] > 1:
                    agree = output.argmax(1) == reference.argmax(1)
                else:
                    agree = (output > 0) == (reference > 0)
                result.argmax_agreement = float(agree.float().mean())
            result.speedup = result.images_per_s / (results[0] if results else result).images_per_s
            log(
                f"bench: {variant.name}: {result.images_per_s:.2f} images/s, "
                f"p50 {result.latency_ms['p50']:.1f} ms"
            )
            results.append(result)
    return {
        "arch": spec.arch,
        "backbone": base.build_config["backbone"],
        "size": list(spec.size),
        "batch_size": spec.batch_size,
        "mode": spec.mode,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "classes": spec.classes,
        "iters": spec.iters,
        "warmup": spec.warmup,
        "torch": torch.__version__,
        "results": [
            r.to_dict() for r in sorted(results, key=lambda r: r.images_per_s, reverse=True)
        ],
    }
