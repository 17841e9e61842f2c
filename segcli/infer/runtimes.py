"""Where a checkpoint runs (`runtime`): PyTorch itself, or onnxruntime or OpenVINO on an ONNX
export of it.

The export is made once, checked against PyTorch by `seg export`'s own check, and kept in the
run's `cache/` folder (the user cache when that folder is read-only), named by the checkpoint's
digest, the shape policy and the runtime's version: a retrained checkpoint or an upgraded
runtime gets a new file, anything else reuses it. `auto` times the runtimes this host has on
the checkpoint once (one warm-up and three forwards each, round-robin, at its input size),
keeps the fastest and records the choice beside the export, keyed by the CPU, so the next call
on this host kind decides at no cost."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcli.checkpoint import CheckpointInfo
from segcli.device import Precision, cache_dir, host_key
from segcli.errors import RuntimeFailure, UsageError
from segcli.files import weights_digest

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
EXPORTED = ("onnxruntime", "openvino")
EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
# Batch, height and width free: one export serves every input size and --size native.
SHAPE_POLICY = "dynamic"


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a Segmenter uses, and why (shown on stderr by the CLI)."""

    name: str
    reason: str
    onnx: Path | None = None  # the export it runs, for onnxruntime and OpenVINO
    automatic: bool = False  # chosen by `auto`: the CLI says which runtime it picked


def installed(runtime: str) -> bool:
    if runtime == "torch":
        return True
    return all(importlib.util.find_spec(name) is not None for name in (runtime, "onnx"))


def require(runtime: str) -> None:
    """A one-line UsageError when `runtime` (or the onnx package its export needs) is missing."""
    if runtime == "torch":
        return
    missing = [name for name in (runtime, "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"`runtime` {runtime} needs {' and '.join(missing)}: "
            f"pip install 'segcli[{EXTRA[runtime]}]'"
        )


def runtime_version(runtime: str) -> str:
    """The installed distribution's version, as pip shows it (a file-name-safe string)."""
    import importlib.metadata

    for distribution in (runtime, f"{runtime}-gpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(importlib.import_module(runtime).__version__))


def export_folder(checkpoint: Path) -> Path:
    """The run's cache/ folder, or the user cache when the run folder cannot be written."""
    folder = checkpoint.parent / "cache"
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = cache_dir() / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_onnx(checkpoint: Path, runtime: str, digest: str | None = None) -> Path:
    """The checked ONNX export of `checkpoint` for `runtime`, made on first use. `digest` is the
    checkpoint's (shortened) sha256 when the caller has it already."""
    digest = digest or weights_digest(checkpoint)[:16]
    name = f"{checkpoint.stem}-{digest}-{SHAPE_POLICY}-{runtime}-{runtime_version(runtime)}.onnx"
    path = export_folder(checkpoint) / name
    if not path.is_file():
        from segcli.checkpoint import load_model
        from segcli.export import export_model

        model, info = load_model(checkpoint)
        export_model(model, info, path, fmt="onnx", dynamic=True)
    return path


def load_exported(runtime: str, path: Path, device: torch.device) -> tuple[Any, CheckpointInfo]:
    from segcli.infer.onnx_model import load_onnx, load_openvino

    return (load_openvino if runtime == "openvino" else load_onnx)(path, device)


def check_runtime(runtime: str, *, members: int, compile: bool, onnx_file: bool) -> None:
    """Refuse combinations that cannot run, before any work."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown `runtime` '{runtime}'; valid: {', '.join(RUNTIMES)}")
    if compile and (onnx_file or runtime in EXPORTED):
        raise UsageError("`compile` applies to .safetensors checkpoints on `runtime` torch")
    if runtime in EXPORTED:
        require(runtime)
        if members > 1:
            raise UsageError(
                f"`runtime` {runtime} runs one checkpoint; an ensemble runs on `runtime` torch"
            )


def choose_runtime(
    runtime: str,
    checkpoint: Path,
    device: torch.device,
    precision: Precision,
    torch_model: Any,
    info: CheckpointInfo,
) -> RuntimeChoice:
    """The runtime to use for one checkpoint. `auto` keeps PyTorch where the other runtimes
    would change the numbers or cannot run (a GPU, a reduced precision), and otherwise times
    each installed runtime on this checkpoint once per CPU kind."""
    if runtime == "torch":
        return RuntimeChoice("torch", "asked for")
    if runtime in EXPORTED:
        return RuntimeChoice(runtime, "asked for", cached_onnx(checkpoint, runtime))
    if device.type != "cpu":
        return RuntimeChoice("torch", f"auto: {device.type} runs on torch", automatic=True)
    if precision.dtype is not None:
        return RuntimeChoice("torch", "auto: the other runtimes compute in float32", automatic=True)
    candidates = [name for name in EXPORTED if installed(name)]
    if not candidates:
        return RuntimeChoice(
            "torch", "auto: neither onnxruntime nor openvino is installed", automatic=True
        )
    return _measured_choice(checkpoint, candidates, precision, torch_model, info)


def _measured_choice(
    checkpoint: Path,
    candidates: list[str],
    precision: Precision,
    torch_model: Any,
    info: CheckpointInfo,
) -> RuntimeChoice:
    digest = weights_digest(checkpoint)[:16]
    record_path = export_folder(checkpoint) / f"{checkpoint.stem}-{digest}-runtime.json"
    host = {"cpu": host_key(), "threads": torch.get_num_threads()}
    versions = {name: runtime_version(name) for name in candidates}
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = None
    if record and record.get("host") == host and record.get("versions") == versions:
        name = record["runtime"]
        onnx = cached_onnx(checkpoint, name, digest) if name in EXPORTED else None
        reason = _describe(record["seconds"], name, cached=True)
        return RuntimeChoice(name, reason, onnx, automatic=True)
    example = torch.zeros(1, int(info.model["in_channels"]), *info.input_size)
    if precision.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    runners: dict[str, Any] = {"torch": torch_model}
    exports: dict[str, Path] = {}
    for name in candidates:
        try:
            exports[name] = cached_onnx(checkpoint, name, digest)
            runners[name] = load_exported(name, exports[name], torch.device("cpu"))[0]
        except (RuntimeFailure, UsageError):
            continue  # a model this exporter cannot take runs on torch
    # Round-robin, best of three each: load from elsewhere on the host drifts over seconds, and
    # timing one runtime after the other would charge the drift to whichever ran during it.
    with torch.inference_mode():
        for run in runners.values():
            run(example)  # warm-up: allocation, kernel selection, graph planning
        seconds = dict.fromkeys(runners, float("inf"))
        for _ in range(3):
            for name, run in runners.items():
                seconds[name] = min(seconds[name], _time_forward(run, example))
    name = min(seconds, key=seconds.__getitem__)
    record = {"host": host, "versions": versions, "runtime": name, "seconds": seconds}
    record_path.write_text(json.dumps(record, indent=2))
    reason = _describe(seconds, name, cached=False)
    return RuntimeChoice(name, reason, exports.get(name), automatic=True)


def _time_forward(run: Any, example: torch.Tensor) -> float:
    started = time.perf_counter()
    run(example)
    return time.perf_counter() - started


def _describe(seconds: dict[str, float], name: str, *, cached: bool) -> str:
    others = ", ".join(
        f"{other} {seconds['torch'] / value:.2f}x"
        for other, value in seconds.items()
        if other not in ("torch", name)
    )
    when = "measured earlier on this CPU kind" if cached else "measured now on this CPU kind"
    speed = f"{seconds['torch'] / seconds[name]:.2f}x torch" if name != "torch" else "fastest"
    return f"auto: {speed}; {when}" + (f"; {others}" if others else "")


def describe_runtime(choice: RuntimeChoice) -> str:
    """One line for stderr: which runtime runs the model, and why."""
    return f"runtime {choice.name} ({choice.reason})"
