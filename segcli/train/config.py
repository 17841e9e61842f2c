"""The training configuration: defaults, a TOML file, then command-line flags (which win)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from segcli.errors import UsageError


@dataclass
class TrainConfig:
    """Every `seg train` setting. Field names are the TOML keys and, with `-` for `_`, the
    command-line flags."""

    arch: str = "unet"
    backbone: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    backbone_weights: str | None = None
    # data
    data: str | None = None  # None: the bundled mock dataset
    format: str = "auto"  # the dataset layout; auto: detected
    classes_file: str | None = None
    foreground: int | None = None
    ignore_values: str | None = None  # "11" or "0,11": raw mask values read as ignore
    reduce_zero_label: bool | None = None  # None: the layout's convention (on for ADE20K)
    val_fraction: float = 0.2  # held out of train when the data has no val split
    folds: int | None = None  # K-fold cross-validation over train and val pooled
    fold: int | None = None  # the fold to train; None with folds: every fold in turn
    in_channels: int = 3
    size: str = "256"
    crop: int | None = None  # native-resolution patches of crop x crop instead of --size
    scale: float = 1.0  # with crop: images are resized by this factor first
    augment: bool = True
    zoom: str = "0.75,1.25"
    scale_min: float | None = None  # a random resized crop instead of zoom
    hflip: bool = True
    vflip: bool = False
    rotate: float = 0.0
    color_jitter: float = 0.0
    workers: int | None = None  # None: device.data_workers decides
    # optimisation
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    power: float = 0.9  # poly's exponent
    min_lr: float = 0.0  # where poly and cosine end; the floor of step and plateau
    loss: str = "ce+0.5*dice"
    class_weights: str | None = None  # "1,2,5" or "auto"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    dice_background: bool = True
    aux_weight: float | None = None  # None: the architecture's own weight
    accum_steps: int = 1
    clip_grad: float | None = None
    # Decay of the exponential moving average of the weights that validation scores and the
    # checkpoints hold; 0 (or None, as runs from before this default stored it) is off.
    ema: float | None = 0.99
    # execution
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None  # None: chosen with the precision
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    # output
    out: str | None = None  # None: runs/<arch>-<backbone>, numbered if taken
    overwrite: bool = False  # replace the run an explicit `out` already holds
    resume: str | None = None
    patience: int = 0  # epochs without val mIoU gain before stopping; 0 = never
    time_limit: float | None = None  # minutes of wall-clock; the schedule is planned to fit
    previews: int = 4
    tracker: str | None = None  # "tensorboard", "mlflow" or both, comma-separated

    def validate(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"`{name}` must be at least 1, not {value}")
        if self.lr <= 0:
            raise UsageError(f"`lr` must be positive, not {self.lr}")
        if not self.power > 0:
            raise UsageError(f"`power` must be positive, not {self.power}")
        if not 0 <= self.min_lr < self.lr:
            raise UsageError(
                f"`min_lr` {self.min_lr}: give an lr from 0 up to, not including, `lr` {self.lr}"
            )
        if (self.workers is not None and self.workers < 0) or self.patience < 0:
            raise UsageError("`workers` and `patience` must not be negative")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UsageError(
                f"`time_limit` must be a positive number of minutes, not {self.time_limit}"
            )
        if not 0 < self.scale <= 4:
            raise UsageError(f"`scale` {self.scale}: give a factor in (0, 4], e.g. 0.5 or 1")
        if self.scale != 1.0 and self.crop is None:
            raise UsageError("`scale` resizes images for `crop` patches; add `crop` N")
        if self.crop is not None and not 16 <= self.crop <= 16384:
            raise UsageError(f"`crop` {self.crop}: give a patch side from 16 to 16384 pixels")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UsageError(f"`clip_grad` must be positive, not {self.clip_grad}")
        if self.ema and not 0 < self.ema < 1:
            raise UsageError(
                f"`ema` {self.ema}: give a decay in (0, 1), e.g. 0.99, or 0 for the raw weights"
            )
        from segcli.data.splits import check_folds, check_val_fraction

        check_val_fraction(self.val_fraction)
        check_folds(self.folds, self.fold)
        self.ignore_value_list()
        from segcli.train.trackers import tracker_names

        tracker_names(self.tracker)

    def ignore_value_list(self) -> list[int]:
        """--ignore-values as integers."""
        from segcli.data.classes import parse_ignore_values

        return parse_ignore_values(self.ignore_values)

    def to_dict(self) -> dict[str, Any]:
        """The run's settings. `overwrite` is an action on the folder, not a setting: kept out,
        so a run's config.toml reused with `--config` never replaces another run."""
        settings = dataclasses.asdict(self)
        settings.pop("overwrite")
        return settings

    def to_toml(self) -> str:
        """The resolved configuration as TOML that `--config` reads back."""
        lines, tables = [], []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                tables.append((key, value))
            elif value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for name, table in tables:
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


FIELD_NAMES = {f.name for f in fields(TrainConfig)}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file; unknown keys are usage errors naming the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"`config`: no such file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"`config` {path}: not valid TOML ({error})") from None
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise UsageError(f"`config` {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def resolve_config(
    config_file: str | Path | None, flags: dict[str, Any], *, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < `base` (a resumed run's config) < TOML file < flags given on the command line
    (those not None). Model options merge key by key."""
    merged: dict[str, Any] = dict(base or {})
    layers = [read_toml(config_file) if config_file else {}, flags]
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key == "model_options":
                merged["model_options"] = {**merged.get("model_options", {}), **value}
            else:
                merged[key] = value
    try:
        config = TrainConfig(**merged)
    except TypeError as error:
        raise UsageError(f"invalid training settings: {error}") from None
    config.validate()
    return config
