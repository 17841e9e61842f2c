"""How a model expects to see images, stored in every checkpoint and exported ONNX file.

The `inference` block of a checkpoint's metadata says how training fed images to the model and
how its outputs become labels, so every consumer (validation, eval, predict, export checks,
bench) prepares images one way:

    {"version": 1, "policy": "resize" | "patches", "size": [H, W], "scale": 1.0,
     "in_channels": C, "mean": [...], "std": [...], "activation": "softmax" | "sigmoid",
     "threshold": 0.5}

`resize`: the decoded image is resized as a whole to `size` (antialiased bilinear), then
scaled to [0, 1] and normalised with `mean`/`std`. `patches`: the model was trained on random
`size` crops of images resized by `scale` (1: native resolution); inference resizes the whole
image by `scale` and slides windows of `size` over it. Checkpoints written before the block
existed were all trained that way, so a missing block means exactly that, with the
checkpoint's top-level size, mean and std. A block with a newer version than this segcli
reads is refused rather than guessed at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcli.errors import UsageError

SPEC_VERSION = 1
POLICIES = ("resize", "patches")
ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class InferenceSpec:
    policy: str
    size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    activation: str
    threshold: float = 0.5
    scale: float = 1.0  # patches: the factor images are resized by before windows are cut
    version: int = SPEC_VERSION

    @property
    def patches(self) -> bool:
        return self.policy == "patches"

    def describe(self) -> str:
        """How training saw images, in a few words: `256x256` or `256x256 patches at 0.5x`."""
        size = f"{self.size[0]}x{self.size[1]}"
        return f"{size} patches at {self.scale:g}x" if self.patches else size

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "policy": self.policy,
            "size": list(self.size),
            "scale": self.scale,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "activation": self.activation,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceSpec:
        """Read a stored block; a newer version or an unknown policy is a UsageError."""
        version = int(data.get("version", 0))
        if version > SPEC_VERSION:
            raise UsageError(
                f"written by a newer segcli (inference spec version {version}; this segcli "
                f"reads up to {SPEC_VERSION}); upgrade segcli: pip install -U segcli"
            )
        if data["policy"] not in POLICIES or data["activation"] not in ACTIVATIONS:
            raise ValueError(
                f"inference spec with policy {data['policy']!r} and activation "
                f"{data['activation']!r}; known: {', '.join(POLICIES)} / {', '.join(ACTIVATIONS)}"
            )
        return cls(
            policy=data["policy"],
            size=(int(data["size"][0]), int(data["size"][1])),
            in_channels=int(data["in_channels"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            activation=data["activation"],
            threshold=float(data.get("threshold", 0.5)),
            scale=float(data.get("scale", 1.0)),
            version=version,
        )

    @classmethod
    def legacy(
        cls,
        size: tuple[int, int],
        in_channels: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        classes: int,
    ) -> InferenceSpec:
        """What every checkpoint without the block was trained with: whole images resized to
        the input size, one-logit models read through a sigmoid at 0.5."""
        activation = "sigmoid" if classes == 1 else "softmax"
        return cls("resize", tuple(size), in_channels, tuple(mean), tuple(std), activation)
