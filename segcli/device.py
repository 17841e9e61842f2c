"""Device and precision choices, made once and shared by train, eval, predict and bench."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcli.errors import UsageError, choose

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _device_named(name: str) -> torch.device:
    choose("`device`", name.split(":")[0], DEVICES)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("`device` cuda: no CUDA device is available; use `device` cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("`device` mps: MPS is not available; use `device` cpu")
    return torch.device(name)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an unavailable device is a usage error. Running
    on the CPU also keeps freed memory in the process (`keep_freed_memory`)."""
    device = _device_named(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of giving it back to the system.
    By default every allocation above 32 MB is mapped when made and unmapped when freed, so each
    training step faults in and zeroes its activations' pages again: on a 2-core Xeon a ResUNet18
    at 256x256, batch 8, took 150,000-170,000 page faults and 0.5 s of kernel time per step,
    and trained 1.04-1.27x faster (mean 1.15x; 1.03x at 128x128, batch 4) with freed memory kept
    (benchmarks/bench_allocator.py). The process then keeps its peak memory until it exits, as
    CUDA's caching allocator does. True when applied: Linux with glibc only; elsewhere nothing
    changes."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels still run natively.
ONEDNN_BF16_ISAS = (
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "ALL",
    "DEFAULT",
)


def onednn_isa_cap() -> str:
    """The ISA ceiling the user set for oneDNN's kernels (ONEDNN_MAX_CPU_ISA, or its older
    name DNNL_MAX_CPU_ISA), upper-cased; "" when none is set."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.strip().upper()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs reporting AVX512-BF16 or AMX, unless ONEDNN_MAX_CPU_ISA caps oneDNN below
    them (its convolutions then emulate bf16 as the CPU without them would). Without native
    bf16 it is emulated (about 7x slower than fp32 on an AVX2 EPYC); with it, it may or may
    not pay off: see `bf16_pays_off`."""
    cap = onednn_isa_cap()
    if cap and cap not in ONEDNN_BF16_ISAS:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


# bf16 autocast is chosen when it runs the calibration workload at least this much faster than
# fp32: below it, its lower precision is not worth a few percent.
BF16_MIN_SPEEDUP = 1.15
PURPOSES = ("train", "infer")


def cache_dir() -> Path:
    """`SEGCLI_CACHE_DIR`, else `$XDG_CACHE_HOME/segcli`, else ~/.cache/segcli."""
    if os.environ.get("SEGCLI_CACHE_DIR"):
        return Path(os.environ["SEGCLI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segcli"


def host_key() -> str:
    """What decides whether bf16 pays off: the CPU model, its bf16/AMX/AVX-512 flags, the core
    count, the torch build and any ONEDNN_MAX_CPU_ISA cap."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = {f for f in value.split() if f.startswith(("avx512", "amx"))}
    key = f"{model}|{' '.join(sorted(flags))}|{os.cpu_count()}|torch {torch.__version__}"
    # A capped oneDNN is another host kind: its speeds must not reuse the uncapped ones.
    cap = onednn_isa_cap()
    return f"{key}|onednn<={cap}" if cap else key


def measure_bf16_speedup(purpose: str) -> float:
    """fp32 time / bf16-autocast time of a small UNet-like conv stack in channels_last (wide
    convs at low resolution, narrow ones at high resolution, as in segmentation decoders), a
    training step (forward + backward) or an inference forward. Best of three each, alternating;
    about a second on a 2-core CPU."""
    import time

    from torch import nn

    generator = torch.Generator().manual_seed(0)
    layers = []
    for width, size in ((16, 96), (64, 48), (256, 12)):
        conv = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        ).to(memory_format=torch.channels_last)
        image = torch.randn(4, width, size, size, generator=generator)
        layers.append((conv, image.contiguous(memory_format=torch.channels_last)))

    def run(dtype: torch.dtype | None) -> float:
        started = time.perf_counter()
        for conv, image in layers:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                if purpose == "train":
                    conv(image).float().mean().backward()
                else:
                    with torch.no_grad():
                        conv(image)
        return time.perf_counter() - started

    run(None), run(torch.bfloat16)  # first calls pick oneDNN kernels
    fp32 = min(run(None) for _ in range(3))
    bf16 = min(run(torch.bfloat16) for _ in range(3))
    return fp32 / bf16


def bf16_pays_off(purpose: str) -> bool:
    """Whether bf16 autocast beats fp32 on this CPU for `purpose` (train | infer): never
    without native bf16; with it, measured once per host kind and torch build and cached in
    `cache_dir()/precision.json`. Native bf16 is not enough: on an AVX512-BF16 EPYC bf16
    trained a ResUNet18 about 1.4x faster than fp32, on an AVX512-BF16 Xeon without AMX it was
    no faster at 256x256 and 0.78x at 128x128."""
    choose("purpose", purpose, PURPOSES)
    if not cpu_has_native_bf16():
        return False
    import json

    from segcli.files import atomic_write_bytes

    path = cache_dir() / "precision.json"
    key = f"{host_key()}|{purpose}"
    cached: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        cached = dict(json.loads(path.read_text()))
    if key not in cached:
        cached[key] = round(measure_bf16_speedup(purpose), 3)
        # A cache that cannot be written (read-only home) only costs a re-measurement.
        with contextlib.suppress(OSError):
            atomic_write_bytes(path, json.dumps(cached, indent=1).encode())
    return cached[key] >= BF16_MIN_SPEEDUP


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32), whether fp16 needs a grad scaler, and the memory format."""

    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(
    amp: str, device: torch.device, channels_last: bool | None = None, purpose: str = "infer"
) -> Precision:
    """`auto`: bf16 on CUDA with bf16 support, fp16 on older CUDA; on CPU bf16 where it is
    native and measured faster for `purpose` (`bf16_pays_off`), fp32 elsewhere (emulated bf16
    is several times slower than fp32); fp32 on MPS. channels_last defaults to
    on for every CPU precision, on CUDA with autocast, and off on MPS: oneDNN's NHWC kernels
    trained a ResUNet18 in fp32 1.8x faster than NCHW on an AVX512-BF16 EPYC (torch 2.14), and
    ran DeepLabv3-ResNet50 inference in fp32 1.2x faster on an AVX2-only one."""
    choose("`amp`", amp, AMP_MODES)
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and bf16_pays_off(purpose):
            amp = "bf16"
        else:
            amp = "off"
    if amp == "fp16" and device.type == "cpu":
        raise UsageError("`amp` fp16 is for CUDA/MPS; on CPU use `amp` bf16 or off")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if channels_last is None:
        channels_last = device.type == "cpu" or (device.type == "cuda" and dtype is not None)
    return Precision(dtype, channels_last)


# On CPUs with at most this many cores, data is loaded in the main process by default.
FEW_CORES = 4


def data_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: `requested`, or by default none on a CPU device with at most
    FEW_CORES cores and 2 elsewhere. On CPU the model's intra-op threads already occupy every
    core, so worker processes only take time from them: on the 2-core CI machine, training a
    ResUNet18 at 256x256 ran at 9.0-9.1 images/s loading in the main process against 7.3-7.9
    with 2 workers (benchmarks/bench_train.py)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cpu" and (cores or 1) <= FEW_CORES:
        return 0
    return 2


def _inductor_default_cache_dir() -> Path | None:
    """Inductor's own default cache folder (`torchinductor_USER` in the temp folder), from the
    module that holds it in this torch release; None if neither does."""
    import importlib

    for module in (
        "torch._inductor.runtime.cache_dir_utils",
        "torch._inductor.runtime.runtime_utils",
    ):
        with contextlib.suppress(ImportError, AttributeError):
            return Path(importlib.import_module(module).default_cache_dir())
    return None


def inductor_cache_dir() -> Path:
    """Where `compiled` has inductor keep its on-disk cache: one folder per host kind (`host_key`),
    vector ISA (`ATEN_CPU_CAPABILITY` included) and thread count, inside inductor's default
    folder. Inductor keys its cache without the vector ISA it generated code for: on an AVX-512
    Xeon, kernels compiled under ATEN_CPU_CAPABILITY=avx2 and reused without it corrupted the
    heap ("malloc_consolidate(): invalid chunk size"), and the reverse gave NaN logits (torch
    2.14.1). One cache folder reached from CPUs of different kinds (a shared /tmp or home, a
    container image) fares alike."""
    import hashlib
    import tempfile

    kind = f"{host_key()}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()}"
    digest = hashlib.sha256(kind.encode()).hexdigest()[:12]
    base = _inductor_default_cache_dir() or Path(tempfile.gettempdir()) / "torchinductor"
    return base / f"segcli-{digest}"


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(model)` with its kernel cache in `inductor_cache_dir()` unless the user chose
    another TORCHINDUCTOR_CACHE_DIR, and without inductor's warning that a CPU-only machine has
    no CUDA runtime (it is harmless there and would be the only line on stderr)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Inductor writes its default into the variable the first time it looks (importing
    # torchvision already does), so only that value or none is ours to replace. It reads the
    # variable whenever it opens its cache, in this process and its compile workers alike.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or Path(chosen) == _inductor_default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    return torch.compile(model)


def to_device(batch: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    """Move an image batch to the device in the model's memory format."""
    batch = batch.to(device, non_blocking=True)
    if precision.channels_last and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


@contextlib.contextmanager
def inference_mode(model: Any) -> Iterator[None]:
    """Eval mode and no autograd, restoring the model's previous mode afterwards. Models that are
    not modules (an onnxruntime session) only get the no-autograd part."""
    if not isinstance(model, torch.nn.Module):
        with torch.inference_mode():
            yield
        return
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
