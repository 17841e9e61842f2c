"""The one path from an image to a mask.

A `Segmenter` is a model (a checkpoint, an exported ONNX file or a live module) together with
its inference spec and how to run it. It owns the three steps every consumer shares:

1. preprocess: the decoded image is resized once (antialiased bilinear) to the training scale,
   then scaled to [0, 1] and normalised (`preprocess`, the evaluation transform of training);
2. run: device, precision, memory layout, optional torch.compile, test-time flips and Gaussian
   sliding windows at the training scale, all averaged as logits (`logits`);
3. postprocess: logits resized (bilinear) to the original size, then argmax or threshold
   (`restore`, `labels`).

Training validation, `seg eval`, `seg predict`, `seg export --check`, `seg bench` and the Python
API (`segcli.Segmenter`) all go through it, so a score describes exactly the masks written.

    from segcli import Segmenter
    segmenter = Segmenter.load("runs/unet-resnet18/best.safetensors")
    mask = segmenter.predict("photo.jpg")      # H x W class indices at the photo's size
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from segcli.device import Precision, compiled, resolve_device, resolve_precision
from segcli.errors import UsageError
from segcli.infer.inference import (
    class_logits,
    labels_from_logits,
    probabilities_from_logits,
    sliding_window_logits,
)
from segcli.infer.runtimes import RuntimeChoice, check_runtime, choose_runtime, load_exported
from segcli.infer.spec import InferenceSpec

if TYPE_CHECKING:
    from PIL import Image

    from segcli.checkpoint import CheckpointInfo

ImageInput = Union[str, Path, "Image.Image", np.ndarray, torch.Tensor]
# `size` value that keeps each image's own pixels.
NATIVE = "native"


class Preprocess:
    """A decoded C x H x W image (uint8, or float in [0, 1]; any channel count) as the
    normalised float32 tensor the model takes: converted to the model's channels, resized once
    (antialiased bilinear) to `size` (None: its own size times `scale`), scaled to [0, 1] and
    normalised.
    It is the evaluation transform of training, and small enough to send to DataLoader
    workers."""

    def __init__(
        self, size: tuple[int, int] | None, spec: InferenceSpec, scale: float = 1.0
    ) -> None:
        from segcli.data import build_transforms

        self.size = size
        self.in_channels = spec.in_channels
        rescale = scale if size is None and scale != 1.0 else None
        self.transform = build_transforms(size, None, spec.mean, spec.std, scale=rescale)

    def __call__(self, image: torch.Tensor, source: str | Path = "image") -> torch.Tensor:
        from torchvision import tv_tensors

        from segcli.data import to_channels

        image = to_channels(image, self.in_channels, source=source)
        return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)


class Segmenter:
    """A model ready to turn images into masks the way it was trained to see them.

    `tta` averages the logits of horizontal and vertical flips; `tile` slides Gaussian-weighted
    windows of that many pixels (overlapping by `overlap`) over the image at the training scale
    (a `patches` model slides windows of its patch size by default); `threshold` overrides the
    spec's threshold of a one-logit model; `size` overrides the training scale (`off_scale`:
    callers warn), `"native"` keeps each image's own pixels."""

    def __init__(
        self,
        model: Any,
        info: CheckpointInfo,
        *,
        device: torch.device,
        precision: Precision,
        tta: bool = False,
        tile: int | None = None,
        overlap: float = 0.25,
        threshold: float | None = None,
        size: tuple[int, int] | str | None = None,
        window_batch: int = 4,
        checkpoints: Sequence[Path] = (),
        runtime: RuntimeChoice | None = None,
    ) -> None:
        if threshold is not None and not info.binary:
            raise UsageError(
                f"`threshold` is for binary (one-logit) models; this one has "
                f"{info.model['classes']} classes and uses the argmax"
            )
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise UsageError(f"`threshold` {threshold}: use a probability in (0, 1)")
        if not 0.0 <= overlap <= 0.9:
            raise UsageError(f"`overlap` {overlap}: use a fraction from 0 to 0.9, e.g. 0.25")
        stride = int(getattr(model, "size_divisor", 1))
        if tile is not None and tile < 16:
            raise UsageError(f"`tile` {tile}: windows must be at least 16 pixels")
        if tile is not None and tile < stride:
            raise UsageError(
                f"`tile` {tile} is smaller than the model's stride ({stride} pixels); "
                f"use `tile` {stride} or more"
            )
        spec = info.spec
        if tile is not None and size == NATIVE and not spec.patches:
            raise UsageError(
                "`tile` slides windows over the image at the model's scale; drop `size` native"
            )
        if tile is None and spec.patches and size is None:
            tile = spec.size[0]
        self.model = model
        self.info = info
        # The files `load` read (several for an ensemble); empty for a live module.
        self.checkpoints = list(checkpoints)
        self.runtime = runtime or RuntimeChoice("torch", "a module given")
        self.spec: InferenceSpec = spec
        self.device = device
        self.precision = precision
        self.tta = tta
        self.tile = tile
        self.overlap = overlap
        self.threshold = self.spec.threshold if threshold is None else threshold
        self.window_batch = window_batch
        # The size images are resized to; None keeps each image's own size times `scale`
        # (--size native, or a patches model at its training scale).
        self.size: tuple[int, int] | None
        self.scale = 1.0
        if size == NATIVE:
            self.size = None
        elif size is None and spec.patches:
            self.size, self.scale = None, spec.scale
        elif size is None:
            self.size = spec.size
        else:
            from segcli.data import parse_size

            self.size = parse_size(size)
        # Asked for a size other than the one training used: callers say so once.
        self.off_scale = size is not None and (spec.patches or self.size != spec.size)
        self.preprocess = Preprocess(self.size, spec, self.scale)

    # -- building --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path | Sequence[str | Path],
        *,
        device: str | torch.device = "auto",
        amp: str = "auto",
        compile: bool = False,
        runtime: str = "torch",
        **options: Any,
    ) -> Segmenter:
        """Open a `.safetensors` checkpoint from `seg train` or an `.onnx` file from
        `seg export`; a run folder stands for its best.safetensors. Several paths, or a
        cross-validation run folder (fold_0/, fold_1/, ...), load an ensemble that averages
        the members' logits (`segcli.infer.ensemble`); `info` is then the first member's.
        `amp` and `compile` are the CLI's `--amp` and `--compile` and apply to every member.
        `runtime` (`segcli.infer.runtimes`): torch, onnxruntime or openvino (a checkpoint runs
        on the others through a cached ONNX export, in float32), or auto (the fastest on this
        host, measured once); `.runtime` says which and why. ONNX files run alone, on
        onnxruntime unless `runtime` is openvino. Other keywords are the
        constructor's."""
        from segcli.infer.ensemble import Ensemble, expand_models, load_members

        paths = expand_models([path] if isinstance(path, (str, Path)) else path)
        if not paths:
            raise UsageError("no checkpoint given; pass a .safetensors file or a run folder")
        device = device if isinstance(device, torch.device) else resolve_device(device)
        onnx_file = len(paths) == 1 and paths[0].suffix.lower() == ".onnx"
        check_runtime(runtime, members=len(paths), compile=compile, onnx_file=onnx_file)
        if onnx_file:  # torch cannot run an ONNX file: any runtime but openvino means ORT
            name = "openvino" if runtime == "openvino" else "onnxruntime"
            choice = RuntimeChoice(name, "an exported file", paths[0])
        else:
            precision = resolve_precision(amp, device)
            members, info = load_members(paths, device)
            if precision.channels_last:
                members = [m.to(memory_format=torch.channels_last) for m in members]
            if compile:
                members = [compiled(m) for m in members]
            model = members[0] if len(members) == 1 else Ensemble(members)
            if len(paths) > 1 and runtime == "auto":
                choice = RuntimeChoice("torch", "auto: an ensemble runs on torch", automatic=True)
            else:
                choice = choose_runtime(runtime, paths[0], device, precision, model, info)
        if choice.onnx is not None:
            stride = getattr(model, "size_divisor", None) if not onnx_file else None
            model, info = load_exported(choice.name, choice.onnx, device)
            if stride is not None:  # the graph has no attributes; `tile` checks against it
                model.size_divisor = stride
            precision = Precision(None, channels_last=False)
        return cls(
            model,
            info,
            device=device,
            precision=precision,
            checkpoints=paths,
            runtime=choice,
            **options,
        )

    # -- what it is ------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names by index; a one-logit model's are {background, foreground}."""
        return self.info.class_names

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """An RGB colour per class index, as `--format color` draws them."""
        from segcli.data import ClassMapping

        return ClassMapping.from_dict(self.info.classes).palette

    @property
    def binary(self) -> bool:
        return self.info.binary

    # -- the three steps -------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """N x K x h x w float32 logits of a batch of preprocessed images (one size), on the
        device: flips and windows averaged as logits."""
        if self.tile is None:
            return class_logits(
                self.model, images, precision=self.precision, device=self.device, tta=self.tta
            )
        return torch.stack(
            [
                sliding_window_logits(
                    self.model,
                    image,
                    tile=self.tile,
                    overlap=self.overlap,
                    precision=self.precision,
                    device=self.device,
                    tta=self.tta,
                    batch_size=self.window_batch,
                )
                for image in images
            ]
        )

    @staticmethod
    def restore(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """K x h x w (or N x K x h x w) logits resized, bilinear with align_corners=False, to
        the original H x W."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        batch = logits if logits.dim() == 4 else logits[None]
        resized = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False)
        return resized if logits.dim() == 4 else resized[0]

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices from N x K x H x W logits: argmax, or the threshold for one logit."""
        return labels_from_logits(logits, self.threshold)

    # -- whole images, for applications ----------------------------------------------------
    def _restored_logits(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        decoded = [as_image_tensor(image) for image in images]
        results: list[torch.Tensor] = []
        with torch.inference_mode():
            batch: list[torch.Tensor] = []
            sizes: list[tuple[int, int]] = []

            def flush() -> None:
                logits = self.logits(torch.stack(batch))
                pairs = zip(logits, sizes, strict=True)
                results.extend(self.restore(one, size) for one, size in pairs)
                batch.clear()
                sizes.clear()

            for image in decoded:
                tensor = self.preprocess(image)
                if batch and tensor.shape != batch[0].shape:
                    flush()
                batch.append(tensor)
                sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            if batch:
                flush()
        return results

    def predict(self, image: ImageInput) -> np.ndarray:
        """The H x W label map (class indices, uint8 up to 256 classes) of one image, at its
        original size. `image`: a file path, a PIL image, an H x W (x C) numpy array or a
        C x H x W tensor; uint8, 16-bit or float in [0, 1]."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        """`predict` for several images, run in batches of equal preprocessed size."""
        dtype = np.uint8 if self.info.scored_classes <= 256 else np.int32
        return [
            self.labels(logits[None])[0].cpu().numpy().astype(dtype)
            for logits in self._restored_logits(images)
        ]

    def probabilities(self, image: ImageInput) -> np.ndarray:
        """K x H x W float32 class probabilities at the image's original size (softmax; one
        channel of foreground probability for a one-logit model)."""
        (logits,) = self._restored_logits([image])
        return probabilities_from_logits(logits[None])[0].cpu().numpy()


def as_image_tensor(image: ImageInput) -> torch.Tensor:
    """A C x H x W tensor from a path, PIL image, numpy array (H x W or H x W x C) or tensor:
    8-bit stays uint8, deeper integer data is scaled to [0, 1] float32, floats stay."""
    from segcli.data import image_from_array, read_image

    if isinstance(image, torch.Tensor):
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3:
            raise UsageError(f"expected a C x H x W image tensor, got shape {list(image.shape)}")
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        return image_from_array(image)
    from PIL import Image

    if isinstance(image, Image.Image):
        return image_from_array(image)
    raise UsageError(
        f"cannot read an image from {type(image).__name__}; pass a path, PIL image, numpy array "
        "or tensor"
    )
