"""Several checkpoints as one model: the mean of their logits.

The K fold models of a cross-validation run (or any checkpoints of one training setup) are
loaded and wrapped in an `Ensemble` module, which the `Segmenter` runs like a single model, so
test-time flips, sliding windows, `--full-res` and every output format work unchanged. Logits
are averaged, the one rule for every averaged prediction (flips, windows, ensembles): the
activation and threshold come last.

Model arguments name checkpoints three ways (`expand_models`): a `.safetensors` or `.onnx`
file is itself, a run folder is its `best.safetensors`, and a cross-validation run folder
(`fold_0/`, `fold_1/`, ... each holding a `best.safetensors`) is every fold's, in fold order.
Members must agree on everything the inference path reads from the first one's metadata
(classes, class mapping, output count, ignore index, inference spec); `load_members` refuses
any difference with one line naming both files."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from segcli.errors import UsageError

if TYPE_CHECKING:
    from segcli.checkpoint import CheckpointInfo

MODEL_SUFFIXES = (".safetensors", ".onnx")
BEST = "best.safetensors"
FOLD = re.compile(r"fold_(\d+)")


class Ensemble(nn.Module):
    """Members run on the same batch; the output is the mean of their logits, in float32 so that
    bf16 members do not lose precision in the sum."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        # Inputs must suit every member (--tile is checked against it).
        self.size_divisor = math.lcm(*(int(getattr(m, "size_divisor", 1)) for m in members))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = self.members[0](images).float()
        for member in self.members[1:]:
            total = total + member(images).float()
        return total / len(self.members)


# ---------------------------------------------------------------------------------------------
# Model arguments


def fold_folders(folder: Path) -> list[Path]:
    """The `fold_N` sub-folders of a cross-validation run, in fold order (fold_10 after fold_9)."""
    if not folder.is_dir():
        return []
    folds = [(FOLD.fullmatch(p.name), p) for p in folder.iterdir() if p.is_dir()]
    return [path for _, path in sorted((int(m[1]), p) for m, p in folds if m)]


def is_model_argument(argument: str) -> bool:
    """Whether a command-line argument names a model rather than an input image: a path ending
    in .safetensors/.onnx (no image has those; one that does not exist is still a model, so it
    fails as a missing checkpoint, exit 2, instead of as an unreadable image), or a folder
    holding best.safetensors or fold_*/best.safetensors."""
    path = Path(argument)
    if argument == "-":
        return False
    if path.suffix.lower() in MODEL_SUFFIXES:
        return True
    if not path.is_dir():
        return False
    return (path / BEST).is_file() or any((fold / BEST).is_file() for fold in fold_folders(path))


def split_models(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """`seg predict MODEL... INPUT...`: the first argument is always a model, and so are the
    ones after it up to the first that is not (`is_model_argument`); the rest are inputs."""
    count = 1
    while count < len(arguments) and is_model_argument(arguments[count]):
        count += 1
    models, inputs = list(arguments[:count]), list(arguments[count:])
    if not inputs:
        raise UsageError(
            f"no inputs after the model{'s' if len(models) > 1 else ''} {' '.join(models)}; "
            "give image files, folders or - for paths on stdin after them"
        )
    return models, inputs


def expand_models(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files of model arguments: a file is itself, a run folder its
    best.safetensors, a cross-validation run folder every fold's best.safetensors in fold
    order. Anything else is returned as it is, for the loader to report."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
        elif (path / BEST).is_file():
            found.append(path / BEST)
        elif folds := fold_folders(path):
            for fold in folds:
                if not (fold / BEST).is_file():
                    raise UsageError(
                        f"{fold}: no {BEST} in this fold (an unfinished fold?); finish its "
                        "training or pass the other folds' checkpoints one by one"
                    )
                found.append(fold / BEST)
        else:
            raise UsageError(
                f"{path}: a folder without {BEST} or fold_N/{BEST}; pass a checkpoint file or "
                "a run folder of seg train"
            )
    return found


def describe(paths: Sequence[Path]) -> str:
    """What a CLI says once when several checkpoints are ensembled."""
    return f"ensemble of {len(paths)} checkpoints: {', '.join(map(str, paths))}"


# ---------------------------------------------------------------------------------------------
# Loading


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{value:g}" for value in values)


def _outputs(count: int) -> str:
    return "1 logit, binary" if count == 1 else f"{count} classes"


def _mapping(info: CheckpointInfo) -> dict[str, Any]:
    from segcli.data import ClassMapping

    # Normalised (older files lack newer keys). Colours only draw --format color, which uses
    # the first member's, so they may differ.
    mapping = ClassMapping.from_dict(info.classes).to_dict()
    mapping.pop("palette", None)
    return mapping


# What the inference path takes from the first member's metadata for all of them: a label for
# the message, the value compared, and how it is shown.
AGREEMENT: tuple[tuple[str, Callable[[CheckpointInfo], Any], Callable[[Any], str]], ...] = (
    ("classes", lambda info: info.class_names, ", ".join),
    ("outputs", lambda info: int(info.model["classes"]), _outputs),
    ("ignore index", lambda info: info.ignore_index, str),
    ("input size", lambda info: info.spec.describe(), str),
    ("input channels", lambda info: info.spec.in_channels, str),
    ("normalisation mean", lambda info: info.spec.mean, _numbers),
    ("normalisation std", lambda info: info.spec.std, _numbers),
    ("activation", lambda info: info.spec.activation, str),
    ("threshold", lambda info: info.spec.threshold, "{:g}".format),
)


def check_agreement(
    first: Path, info: CheckpointInfo, other: Path, other_info: CheckpointInfo
) -> None:
    """Raise a one-line UsageError naming both files and the first thing they differ in."""
    differences = [
        (label, show(value(info)), show(value(other_info)))
        for label, value, show in AGREEMENT
        if value(info) != value(other_info)
    ]
    mapping, other_mapping = _mapping(info), _mapping(other_info)
    differences += [
        (f"class mapping {key}", str(mapping.get(key)), str(other_mapping.get(key)))
        for key in sorted(mapping.keys() | other_mapping.keys())
        if mapping.get(key) != other_mapping.get(key)
    ]
    if differences:
        label, shown, other_shown = differences[0]
        raise UsageError(
            f"{first} and {other} differ in {label} ({shown} vs {other_shown}); ensemble "
            "checkpoints of one training setup, e.g. the folds of one run"
        )


def load_members(
    paths: Sequence[Path], device: torch.device
) -> tuple[list[nn.Module], CheckpointInfo]:
    """Every member in eval mode on `device`, and the first one's CheckpointInfo, after checking
    each against the first. Only .safetensors checkpoints: ONNX files run alone."""
    from segcli.checkpoint import load_model

    for path in paths:
        if len(paths) > 1 and path.suffix.lower() == ".onnx":
            raise UsageError(
                f"{path}: an ensemble takes .safetensors checkpoints; an ONNX file runs alone"
            )
    first, info = load_model(paths[0], device)
    members = [first]
    for path in paths[1:]:
        model, member_info = load_model(path, device)
        check_agreement(paths[0], info, path, member_info)
        members.append(model)
    return members, info
