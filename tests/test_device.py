"""Device, precision and data-loading defaults shared by train, eval and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from segcli import device as device_module
from segcli.device import data_workers, resolve_device, resolve_precision
from segcli.errors import UsageError

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("cores", "device", "expected"), [(2, "cpu", 0), (4, "cpu", 0), (8, "cpu", 2), (2, "cuda", 2)]
)
def test_default_workers_leave_small_cpus_to_the_model(
    monkeypatch: pytest.MonkeyPatch, cores: int, device: str, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert data_workers(None, torch.device(device)) == expected
    assert data_workers(3, torch.device(device)) == 3  # an explicit --workers always wins


def test_precision_choices(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device_module, "measure_bf16_speedup", lambda purpose: 1.6)
    auto = resolve_precision("auto", CPU)
    assert auto.dtype is torch.bfloat16 and auto.channels_last
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    fp32 = resolve_precision("auto", CPU)
    # Without native bf16, fp32 in channels_last: NCHW fp32 trained 1.8x slower on AVX2.
    assert fp32.dtype is None and fp32.channels_last
    off = resolve_precision("off", CPU)
    assert off.dtype is None and off.channels_last
    assert not resolve_precision("off", CPU, channels_last=False).channels_last
    assert not resolve_precision("bf16", CPU, channels_last=False).channels_last
    with pytest.raises(UsageError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UsageError, match="`amp`"):
        resolve_precision("fp8", CPU)


def test_unavailable_device_is_a_usage_error() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(UsageError, match="`device`"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="cuda"):
            resolve_device("cuda")


def test_auto_precision_uses_bf16_only_where_it_measured_faster(monkeypatch, tmp_path) -> None:
    # An AVX512-BF16 Xeon trained no faster in bf16 than in fp32 (0.78x at 128x128): the CPU
    # flag alone picked the slower precision there. The decision is measured once per host
    # and purpose, cached, and a training decision can differ from an inference one.
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    calls: list[str] = []

    def measured(purpose: str) -> float:
        calls.append(purpose)
        return {"train": 0.8, "infer": 1.3}[purpose]

    monkeypatch.setattr(device_module, "measure_bf16_speedup", measured)
    assert resolve_precision("auto", CPU, purpose="train").dtype is None
    assert resolve_precision("auto", CPU, purpose="infer").dtype is torch.bfloat16
    assert resolve_precision("auto", CPU, purpose="train").dtype is None
    assert calls == ["train", "infer"]  # the second train call read the cache
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 2
    # An explicit --amp bf16 is honoured whatever was measured.
    assert resolve_precision("bf16", CPU, purpose="train").dtype is torch.bfloat16


def test_an_unwritable_or_corrupt_cache_only_costs_a_measurement(monkeypatch, tmp_path) -> None:
    (tmp_path / "precision.json").write_text("{not json")
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device_module, "measure_bf16_speedup", lambda purpose: 2.0)
    assert resolve_precision("auto", CPU).dtype is torch.bfloat16
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path / "file.txt" / "below-a-file"))
    (tmp_path / "file.txt").write_text("")
    assert resolve_precision("auto", CPU).dtype is torch.bfloat16


def test_calibration_times_both_precisions() -> None:
    # The real measurement: a positive, finite ratio for both purposes (a swapped or constant
    # timer would give 1.0 exactly or fail).
    for purpose in ("train", "infer"):
        ratio = device_module.measure_bf16_speedup(purpose)
        assert 0.01 < ratio < 100 and ratio != 1.0


def test_without_native_bf16_nothing_is_measured(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SEGCLI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(device_module, "measure_bf16_speedup", lambda purpose: 1 / 0)
    assert resolve_precision("auto", CPU, purpose="train").dtype is None
    assert not (tmp_path / "precision.json").exists()


REFAULTS = """
import resource, sys, torch
from segcli.device import resolve_device
if sys.argv[1] == "cpu":
    resolve_device("cpu")
for _ in range(6):  # like training steps: the same large activations made and freed each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(16 * 2**20).fill_(1.0) for _ in range(4)]  # 4 x 64 MB
    del activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="the allocator setting is glibc's"
)
def test_cpu_device_reuses_freed_tensor_memory_instead_of_faulting_it_in_again() -> None:
    # Catches training on CPU with glibc's default of unmapping every freed tensor above 32 MB:
    # every step faults in and zeroes all 65,536 pages of its activations again (0.5 s of kernel
    # time per ResUNet18 step at 256x256). A control process that never picks the CPU device
    # shows the measurement sees those faults.
    import subprocess
    import sys

    def faults(device: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", REFAULTS, device], capture_output=True, text=True, check=True
        )
        return int(run.stdout.strip())

    assert faults("none") > 30000
    assert faults("cpu") < 1000


@pytest.mark.parametrize(
    ("cap", "native"), [("avx2", False), ("AVX512_CORE", False), ("AVX512_CORE_AMX", True)]
)
def test_onednn_isa_cap_decides_native_bf16(monkeypatch, tmp_path, cap: str, native: bool) -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon makes oneDNN emulate bf16 (as an AVX2 EPYC does):
    # reading the CPU flags alone chose bf16 there, about 7x slower than fp32; and the cached
    # speedup of the uncapped host was reused for the capped one.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
    real_path = device_module.Path
    monkeypatch.setattr(
        device_module, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p)
    )
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    device_module.cpu_has_native_bf16.cache_clear()
    try:
        assert device_module.cpu_has_native_bf16()
        uncapped_key = device_module.host_key()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        device_module.cpu_has_native_bf16.cache_clear()
        assert device_module.cpu_has_native_bf16() is native
        assert device_module.host_key() != uncapped_key
    finally:
        monkeypatch.undo()
        device_module.cpu_has_native_bf16.cache_clear()


def test_compile_cache_is_one_folder_per_vector_isa_and_thread_count(monkeypatch, tmp_path) -> None:
    # Inductor's own cache folder is shared by every vector ISA and thread count, and its keys
    # omit the ISA: AVX2 kernels reused on an AVX-512 CPU corrupted the heap (the slow test
    # below shows it end to end). A user's own TORCHINDUCTOR_CACHE_DIR is theirs to keep.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # inductor's default is under it
    folders = {}
    for capability, threads in (("AVX2", 2), ("AVX512", 2), ("AVX2", 1)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        for inherited in (None, str(device_module._inductor_default_cache_dir())):
            if inherited is None:
                monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
            else:
                monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inherited)
            device_module.compiled(torch.nn.Identity())
            folders[capability, threads, inherited] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert len(set(folders.values())) == 3  # same folder whether inductor had set its default
    assert all(folder.startswith(str(tmp_path)) for folder in folders.values())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    device_module.compiled(torch.nn.Identity())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


COMPILE_AND_COMPARE = """
import torch
from segcli.device import compiled
from segcli.models import build_model

torch.manual_seed(0)
model = build_model("fcn", "vgg11", classes=3, stride=32, fc_width=64).eval()
image = torch.randn(1, 3, 96, 128)
with torch.no_grad():
    eager, fast = model(image), compiled(model)(image)
print("max difference", (eager - fast).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="needs a CPU with two vector ISAs (AVX2 and AVX-512) to compile for",
)
def test_compiled_kernels_are_not_reused_for_another_vector_isa(tmp_path) -> None:
    # Inductor keys its on-disk cache without the vector ISA: an FCN compiled under
    # ATEN_CPU_CAPABILITY=avx2 and then run on the same AVX-512 CPU without it reused the AVX2
    # kernels and corrupted the heap (and the reverse gave NaN logits: 54% pixel agreement).
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)  # inductor's default cache folder lives there
    for capability in ("avx2", None):
        run_env = dict(env, ATEN_CPU_CAPABILITY=capability) if capability else env
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_AND_COMPARE],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        difference = float(done.stdout.split()[-1])
        assert difference < 1e-4, (capability, difference)
