"""Which images train and which validate: the dataset's own val split, a held-out fraction of
train when it has none, or one fold of a K-fold cross-validation. Deterministic for a seed
(numpy's PCG64 stream does not change across numpy versions), and saved to the run folder's
`split.json` so a resumed run validates on the same images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import UsageError

if TYPE_CHECKING:  # the flag checks below run before training imports torch
    from segcli.data.dataset import DatasetInfo

Pair = tuple[Path, Path]

SPLIT_FILE = "split.json"


@dataclass
class SplitPlan:
    """`kind`: "dataset" (its own train/val), "holdout" (val_fraction of train) or "kfold"
    (fold `fold` of `folds`, train and val pooled)."""

    kind: str
    train: list[Pair]
    val: list[Pair]
    seed: int = 0
    val_fraction: float | None = None
    folds: int | None = None
    fold: int | None = None

    def describe(self) -> str:
        if self.kind == "holdout":
            return (
                f"no val split: holding out {self.val_fraction:g} of train ({len(self.val)} "
                f"images, `val_fraction`, by `seed` {self.seed}) as val"
            )
        if self.kind == "kfold":
            return (
                f"fold {self.fold} of {self.folds} (train and val pooled, by `seed` {self.seed}): "
                f"{len(self.train)} train / {len(self.val)} val images"
            )
        return "the dataset's own train and val splits"

    def to_dict(self, root: Path) -> dict[str, Any]:
        def names(pairs: list[Pair]) -> list[list[str]]:
            return [[_relative(image, root), _relative(mask, root)] for image, mask in pairs]

        return {
            "kind": self.kind,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "folds": self.folds,
            "fold": self.fold,
            "train": names(self.train),
            "val": names(self.val),
        }


def _relative(path: Path, root: Path) -> str:
    # Rasterised masks live in a cache outside the dataset: kept as absolute paths.
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def check_val_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise UsageError(f"`val_fraction` {fraction}: give a fraction in (0, 1), e.g. 0.2")


def check_folds(folds: int | None, fold: int | None) -> None:
    """Refuse a fold count or fold number no split can have (`fold` None: every fold)."""
    if folds is not None and folds < 2:
        raise UsageError(f"`folds` {folds}: cross-validation needs at least 2 folds")
    if fold is not None and folds is None:
        raise UsageError(f"`fold` {fold} needs `folds` K (the number of folds)")
    if fold is not None and folds is not None and not 0 <= fold < folds:
        raise UsageError(f"`fold` {fold}: give a fold from 0 to {folds - 1} (`folds` {folds})")


def _apart(pairs: list[Pair], chosen: set[int]) -> tuple[list[Pair], list[Pair]]:
    """(the pairs not chosen, the chosen ones), each in the original order."""
    train = [pair for index, pair in enumerate(pairs) if index not in chosen]
    val = [pair for index, pair in enumerate(pairs) if index in chosen]
    return train, val


def holdout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val): `fraction` of `pairs` (at least one) drawn by `seed`, each part in the
    original order."""
    check_val_fraction(fraction)
    if len(pairs) < 2:
        raise UsageError(
            f"`val_fraction`: the train split has {len(pairs)} image(s); holding out a val "
            "split needs at least 2 (add images or a val/ split)"
        )
    count = min(max(1, round(len(pairs) * fraction)), len(pairs) - 1)
    return _apart(pairs, set(np.random.default_rng(seed).permutation(len(pairs))[:count].tolist()))


def kfold(pairs: list[Pair], folds: int, fold: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val) of fold `fold`: the pairs are shuffled once by `seed` and cut into `folds`
    parts of sizes differing by at most one; part `fold` validates."""
    check_folds(folds, fold)
    if len(pairs) < folds:
        raise UsageError(
            f"`folds` {folds}: the pooled train and val splits hold {len(pairs)} images, fewer "
            "than the folds; lower `folds`"
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    return _apart(pairs, set(np.array_split(order, folds)[fold].tolist()))


def plan_split(
    info: DatasetInfo,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    folds: int | None = None,
    fold: int | None = None,
) -> SplitPlan:
    """The split a run trains with: fold `fold` of `folds` over train and val pooled; else the
    dataset's train and val; else `val_fraction` of train held out."""
    check_val_fraction(val_fraction)
    check_folds(folds, fold)
    train = info.pairs("train")
    if folds is not None and fold is None:
        raise UsageError("`fold` I and `folds` K go together (`folds` K alone trains every fold)")
    if folds is not None and fold is not None:
        pooled = sorted([*train, *info.splits.get("val", [])], key=lambda pair: str(pair[0]))
        fold_train, fold_val = kfold(pooled, folds, fold, seed)
        return SplitPlan("kfold", fold_train, fold_val, seed, folds=folds, fold=fold)
    if "val" in info.splits:
        return SplitPlan("dataset", train, info.splits["val"], seed)
    held_train, held_val = holdout(train, val_fraction, seed)
    return SplitPlan("holdout", held_train, held_val, seed, val_fraction=val_fraction)


def save_split(plan: SplitPlan, root: Path, path: Path) -> None:
    from segcli.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(plan.to_dict(root), indent=1) + "\n").encode())


def load_split(path: Path, root: Path) -> SplitPlan:
    """A saved split, its files checked against the dataset as it is now."""
    try:
        data = json.loads(path.read_text())
        parts = {
            name: [(_resolve(image, root), _resolve(mask, root)) for image, mask in data[name]]
            for name in ("train", "val")
        }
        plan = SplitPlan(
            data["kind"],
            parts["train"],
            parts["val"],
            int(data["seed"]),
            data.get("val_fraction"),
            data.get("folds"),
            data.get("fold"),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{path}: not a readable split file ({error}); restore it or start a new run"
        ) from None
    missing = [image for image, _ in plan.train + plan.val if not image.is_file()]
    if missing:
        raise UsageError(
            f"{path}: lists {missing[0]}, which no longer exists ({len(missing)} missing); "
            "train on the data the run started with or start a new run"
        )
    return plan


def _resolve(name: str, root: Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path
