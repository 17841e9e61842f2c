"""K-fold cross-validation: every fold of one split trained in turn, each in its own run folder
`RUN/fold_I/`, then the folds' best val mIoU with their mean and standard deviation. The folds
folder is what `seg predict` and `seg eval` take to ensemble the fold models."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from segcli.train.config import TrainConfig


def fold_dir(run: Path, fold: int) -> Path:
    return run / f"fold_{fold}"


def run_folder(config: TrainConfig) -> Path:
    """The folds' parent folder: --out, else runs/ARCH-BACKBONE-folds (numbered when taken)."""
    from segcli.models.registry import resolve_backbone
    from segcli.train.trainer import default_run_dir

    if config.out:
        return Path(config.out)
    backbone = resolve_backbone(config.arch, config.backbone)
    return default_run_dir(config, f"{backbone}-folds")


def train_folds(config: TrainConfig, reporter: Any = None) -> dict[str, Any] | None:
    """Train folds 0..K-1 of `config.folds` into `run_folder(config)/fold_I`; returns each
    fold's summary and the mean and (population) standard deviation of their best val mIoU,
    or None on the DDP ranks other than 0."""
    from segcli.train.trainer import Trainer

    assert config.folds is not None
    run = run_folder(config)
    summaries = []
    for fold in range(config.folds):
        if reporter is not None:
            reporter.log(f"fold {fold} of {config.folds} -> {fold_dir(run, fold)}")
        fold_config = dataclasses.replace(config, fold=fold, out=str(fold_dir(run, fold)))
        summaries.append(Trainer(fold_config, reporter).run())
    if any(summary is None for summary in summaries):
        return None
    scores = [summary["val"]["miou"] for summary in summaries]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((score - mean) ** 2 for score in scores) / len(scores))
    return {"run": str(run), "folds": summaries, "miou_mean": mean, "miou_std": std}
