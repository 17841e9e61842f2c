"""Checkpoints: one `.safetensors` file holds the model's state dict, and
its metadata holds, as JSON, everything needed to rebuild and use the model. Loading never
unpickles anything. Every write goes to a temporary file first and is renamed into place, so
a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcli import __version__
from segcli.errors import UsageError
from segcli.files import atomic_write
from segcli.infer.spec import InferenceSpec

FORMAT = "segcli-checkpoint/1"
METADATA_KEY = "segcli"
# Options that fetch or read weights at build time; a checkpoint already holds the weights.
WEIGHT_OPTIONS = ("pretrained", "backbone_weights")


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model, besides the weights."""

    model: dict[str, Any]  # build_model arguments: arch, backbone, in_channels, classes, options
    classes: dict[str, Any]  # the dataset's ClassMapping.to_dict()
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ignore_index: int = 255
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    # The stored `inference` block, when the file has one (see segcli.infer.spec).
    inference: dict[str, Any] | None = None
    # A random id of this write, recorded by the training state written with it, so resume can
    # tell that the two files belong together without hashing the weights.
    write_id: str | None = None

    @property
    def spec(self) -> InferenceSpec:
        """How this model expects images: the stored block, or the legacy defaults that every
        checkpoint written before the block was trained with."""
        if self.inference is not None:
            return InferenceSpec.from_dict(self.inference)
        return InferenceSpec.legacy(
            self.input_size,
            int(self.model["in_channels"]),
            self.mean,
            self.std,
            int(self.model["classes"]),
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.classes.get("names", []))

    @property
    def binary(self) -> bool:
        """A one-logit model, scored as {background, foreground}."""
        return int(self.model["classes"]) == 1

    @property
    def scored_classes(self) -> int:
        return max(int(self.model["classes"]), 2)

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "version": self.version,
            "model": self.model,
            "classes": self.classes,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": self.ignore_index,
            "config": self.config,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "inference": self.spec.to_dict(),
        }
        if self.write_id is not None:
            data["write_id"] = self.write_id
        return json.dumps(data, allow_nan=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> CheckpointInfo:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {data.get('format')!r}")
        info = cls(
            model=data["model"],
            classes=data["classes"],
            input_size=tuple(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            ignore_index=data.get("ignore_index", 255),
            config=data.get("config", {}),
            epoch=data.get("epoch", 0),
            metrics=data.get("metrics", {}),
            version=data.get("version", "unknown"),
            inference=data.get("inference"),
            write_id=data.get("write_id"),
        )
        info.spec  # noqa: B018 - a newer or unknown spec is refused when the file is read
        return info


def model_build_config(model: nn.Module) -> dict[str, Any]:
    """The `build_model` arguments of a model, without options that fetch weights."""
    config = dict(model.build_config)
    config["options"] = {k: v for k, v in config["options"].items() if k not in WEIGHT_OPTIONS}
    return config


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str | Path, model: nn.Module, info: CheckpointInfo) -> None:
    """Write the model's weights and `info` to `path` atomically."""
    from safetensors.torch import save_file

    model = unwrap(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: info.to_json()}
    atomic_write(Path(path), lambda temporary: save_file(state, temporary, metadata=metadata))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read weights and info, or raise a UsageError saying what is wrong with the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise UsageError(
            f"{path}: not a safetensors checkpoint ({type(error).__name__}); pass a .safetensors "
            "file written by 'seg train'"
        ) from None
    if METADATA_KEY not in metadata:
        raise UsageError(
            f"{path}: a safetensors file without segcli metadata; not a seg checkpoint"
        )
    return state, info_from_metadata(path, metadata[METADATA_KEY])


def info_from_metadata(path: str | Path, text: str) -> CheckpointInfo:
    """A file's `segcli` metadata, or a one-line UsageError naming `path`: what is unreadable,
    or that a newer segcli wrote it."""
    try:
        return CheckpointInfo.from_json(text)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    except (ValueError, KeyError) as error:
        raise UsageError(f"{path}: unreadable segcli metadata ({error})") from None


def model_options(info: CheckpointInfo) -> dict[str, Any]:
    """The model options a checkpoint was built with. Checkpoints written before UNet's default
    decoder depended on the encoder recorded None for the published decoder they used."""
    options = dict(info.model["options"])
    if info.model["arch"] == "unet" and options.get("decoder_channels") is None:
        options["decoder_channels"] = "published"
    return options


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes, load its weights, and put it in eval mode."""
    from segcli.models import build_model

    state, info = read_checkpoint(path)
    spec = info.model
    model = build_model(
        spec["arch"], spec["backbone"], spec["in_channels"], spec["classes"], **model_options(info)
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        # torch's first line only says "Error(s) in loading state_dict"; the next names keys.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise UsageError(f"{path}: weights do not fit {spec['arch']} ({detail})") from None
    return model.to(device).eval(), info
